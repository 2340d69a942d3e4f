import pytest


@pytest.fixture(scope="session")
def st_minilm(minilm):
    """sentence-transformers' own pipeline on the same model directory: the oracle."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm.path), device="cpu")
