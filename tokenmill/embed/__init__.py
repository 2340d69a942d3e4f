"""Embeddings: the packed encoder engine, the embed job, vector files and ANN indexes."""
