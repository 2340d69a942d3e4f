import os
import subprocess

import pytest

from helpers import tokenmill_cmd


@pytest.fixture(scope="session")
def cli_env(xdg_cache_home, smollm2):
    """Environment for `tokenmill` subprocesses: the session's model cache (already converted by `smollm2`)."""
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(xdg_cache_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture
def run_cli(cli_env):
    def run(*args, timeout=300, check=None):
        proc = subprocess.run(tokenmill_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return proc

    return run
