import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def cli_env(xdg_cache_home, smollm2):
    """Environment for `tokenmill` subprocesses: the session's model cache (already converted by `smollm2`)."""
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(xdg_cache_home)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tokenmill_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", *map(str, args)]


@pytest.fixture
def run_cli(cli_env):
    def run(*args, timeout=300, check=None):
        proc = subprocess.run(tokenmill_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return proc

    return run


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]
