"""ANN indexes over a vectors file (faiss): build, save with the id mapping and model name, load, search, recall.

An index directory holds ``index.faiss``, ``ids.parquet`` (row i of the index is id ``ids[i]``) and ``meta.json``
(the vectors file's tokenmill metadata: model, pooling, normalisation; plus the index kind, metric, size, build time
and measured recall@10). Normalised vectors use inner product (= cosine); others use L2.

Kinds: ``flat`` (exact), ``hnsw`` (graph, M=32, efSearch 128), ``ivf`` (inverted lists over ~4 sqrt(n) k-means
centroids, nprobe 16). Recall@10 is measured against exact search over the same vectors.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenmill.embed.vectors import iter_vector_batches, read_vector_metadata

INDEX_KINDS = ("flat", "hnsw", "ivf")
HNSW_M = 32
HNSW_EF_SEARCH = 128
IVF_NPROBE = 16


def _faiss():
    import faiss

    return faiss


def load_vectors(path: Path) -> tuple[list[str], np.ndarray, dict]:
    """(ids, vectors [n, dim] float32, tokenmill metadata) of a vectors file."""
    meta = read_vector_metadata(path)
    ids: list[str] = []
    chunks = []
    for batch_ids, vecs in iter_vector_batches(path):
        ids.extend(batch_ids)
        chunks.append(vecs)
    if not chunks:
        raise ValueError(f"{path} holds no vectors")
    return ids, np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32), meta


def build_faiss_index(vectors: np.ndarray, kind: str, metric_ip: bool, seed: int = 0):
    """An index of ``kind`` holding ``vectors`` [n, dim] in order."""
    faiss = _faiss()
    n, dim = vectors.shape
    metric = faiss.METRIC_INNER_PRODUCT if metric_ip else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.IndexFlatIP(dim) if metric_ip else faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, metric)
        index.hnsw.efConstruction = 128
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39 or 1))  # faiss wants >= 39 training points per centroid
        quantizer = faiss.IndexFlatIP(dim) if metric_ip else faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, metric)
        index.cp.seed = seed
        index.train(vectors)
        index.nprobe = min(IVF_NPROBE, nlist)
    else:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
    index.add(vectors)
    return index


def recall_at_k(index, vectors: np.ndarray, queries: np.ndarray, k: int, metric_ip: bool) -> float:
    """Share of the exact top-k (by brute force over ``vectors``) that ``index`` returns, averaged over queries."""
    faiss = _faiss()
    exact = faiss.IndexFlatIP(vectors.shape[1]) if metric_ip else faiss.IndexFlatL2(vectors.shape[1])
    exact.add(vectors)
    k = min(k, len(vectors))
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    hits = sum(len(set(t) & set(g)) for t, g in zip(truth.tolist(), got.tolist()))
    return hits / (k * len(queries))


@dataclass
class IndexReport:
    kind: str
    count: int
    dim: int
    metric: str
    build_seconds: float
    recall_at_10: float
    num_queries: int
    queries_source: str

    def render(self) -> str:
        return (f"tokenmill: built a {self.kind} index of {self.count:,} vectors (dim {self.dim}, {self.metric}) in "
                f"{self.build_seconds:.2f} s; recall@10 {self.recall_at_10:.4f} against exact search on "
                f"{self.num_queries} {self.queries_source}")


def build_index(vectors_path: Path, out_dir: Path, kind: str = "hnsw", queries_path: Path | None = None,
                num_queries: int = 200, seed: int = 0) -> IndexReport:
    """Builds and saves an index; measures recall@10 on held-out query vectors (``queries_path``, e.g. another
    ``tokenmill embed`` output) or, without them, on a sample of the indexed vectors."""
    faiss = _faiss()
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
    ids, vectors, meta = load_vectors(vectors_path)
    metric_ip = bool(meta.get("normalize"))
    t0 = time.perf_counter()
    index = build_faiss_index(vectors, kind, metric_ip, seed)
    build_s = time.perf_counter() - t0
    if queries_path is not None:
        _, queries, qmeta = load_vectors(queries_path)
        if qmeta.get("model") != meta.get("model") or qmeta.get("dim") != meta.get("dim"):
            raise ValueError(f"{queries_path} was embedded with another model than {vectors_path}")
        source = f"held-out queries from {queries_path.name}"
    else:
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(vectors), size=min(num_queries, len(vectors)), replace=False)
        queries = vectors[np.sort(sample)]
        source = "sampled indexed vectors (pass --queries for held-out ones)"
    recall = recall_at_k(index, vectors, queries, 10, metric_ip)
    out_dir.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(out_dir / "index.faiss"))
    pq.write_table(pa.table({"id": pa.array(ids, pa.string())}), out_dir / "ids.parquet")
    report = IndexReport(kind, len(ids), vectors.shape[1], "inner_product" if metric_ip else "l2", build_s, recall,
                         len(queries), source)
    (out_dir / "meta.json").write_text(json.dumps({**meta, "index": report.__dict__,
                                                   "vectors": str(vectors_path.resolve())}, indent=1))
    return report


class VectorIndex:
    """A saved index directory, ready to search."""

    def __init__(self, directory: Path) -> None:
        faiss = _faiss()
        if not (directory / "meta.json").is_file():
            raise FileNotFoundError(f"{directory} is not a tokenmill index directory (no meta.json)")
        self.meta = json.loads((directory / "meta.json").read_text())
        self.index = faiss.read_index(str(directory / "index.faiss"))
        self.ids = pq.read_table(directory / "ids.parquet").column("id").to_pylist()
        info = self.meta["index"]
        if info["kind"] == "hnsw":
            self.index.hnsw.efSearch = HNSW_EF_SEARCH
        elif info["kind"] == "ivf":
            self.index.nprobe = min(IVF_NPROBE, self.index.nlist)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """Per query, up to k (id, score) best first; score is the inner product (cosine) or the L2 distance."""
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(self.ids)))
        return [[(self.ids[r], float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]
