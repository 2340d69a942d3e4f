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
