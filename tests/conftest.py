import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# The Triton kernels run under Triton's interpreter on CPU tensors where there is no GPU (the variable must be set
# before any kernel module is imported: Triton reads it when a kernel is defined). Subprocesses inherit it.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def xdg_cache_home(tmp_path_factory):
    """A private XDG cache for the session, so tests also cover the first (converting) load of the GGUF file;
    subprocesses get it through XDG_CACHE_HOME. The C++ kernels are the exception: built once per machine (by
    `make setup`'s `tokenmill build-kernels`), they are shared with the user's cache rather than rebuilt per session."""
    import os

    xdg = tmp_path_factory.mktemp("xdg-cache")
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenmill" / "kernels"
    user.mkdir(parents=True, exist_ok=True)
    (xdg / "tokenmill").mkdir()
    (xdg / "tokenmill" / "kernels").symlink_to(user, target_is_directory=True)
    return xdg


@pytest.fixture(scope="session")
def cache_dir(xdg_cache_home):
    return str(xdg_cache_home / "tokenmill")


@pytest.fixture(scope="session")
def smollm2(cache_dir):
    """The embedded default model, loaded once for the session (the engine is reused across tests)."""
    from tokenmill import LLM

    return LLM(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own LlamaForCausalLM from the same GGUF file (its own dequantisation and Q/K un-permute)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tokenmill.model.loader import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def embed_env():
    """Environment for `tokenmill embed` subprocesses."""
    import os

    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def cli_env(xdg_cache_home, smollm2):
    """Environment for `tokenmill` subprocesses: the session's model cache (already converted by `smollm2`)."""
    import os

    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(xdg_cache_home)
    env["XDG_DATA_HOME"] = str(xdg_cache_home.parent / "xdg-data")  # a server's default --state-dir
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def minilm():
    """The embedded default embedding model (all-MiniLM-L6-v2), loaded once."""
    from tokenmill.embed.embedder import Embedder

    return Embedder()


@pytest.fixture
def run_cli(cli_env):
    """Runs `tokenmill ARGS` in a subprocess; ``check``: the exit code it must end with."""
    from helpers import tokenmill_cmd

    def run(*args, timeout=300, check=None):
        proc = subprocess.run(tokenmill_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=timeout)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        return proc

    return run
