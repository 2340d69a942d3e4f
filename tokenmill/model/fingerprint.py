"""A model's fingerprint: what a job's manifest and the SmoothQuant cache key a model by (below both, so neither
layer imports the other)."""

from __future__ import annotations

import hashlib
from pathlib import Path

FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed at each end of a large model file


def model_fingerprint(path: Path) -> str:
    """A SHA-256 over the model's files: small files (config, tokenizer, chat template) whole; weight files by size
    and their first and last MiB, so fingerprinting a 10 GB model costs milliseconds, not a minute."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= 4 * FINGERPRINT_SAMPLE:
                h.update(fh.read())
            else:
                h.update(fh.read(FINGERPRINT_SAMPLE))
                fh.seek(size - FINGERPRINT_SAMPLE)
                h.update(fh.read(FINGERPRINT_SAMPLE))
    return h.hexdigest()
