import os

import pytest


@pytest.fixture(scope="session")
def minilm():
    """The embedded default embedding model (all-MiniLM-L6-v2), loaded once."""
    from tokenmill.embed.embedder import Embedder

    return Embedder()


@pytest.fixture(scope="session")
def st_minilm(minilm):
    """sentence-transformers' own pipeline on the same model directory: the oracle."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.path), device="cpu")


@pytest.fixture(scope="session")
def embed_env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
