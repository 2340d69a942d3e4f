import subprocess

import pytest

from helpers import tokenmill_cmd


@pytest.fixture
def run_cli(cli_env):
    def run(*args, timeout=300, check=None):
        proc = subprocess.run(tokenmill_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return proc

    return run
