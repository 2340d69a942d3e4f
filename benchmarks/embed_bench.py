"""The ``embed`` section of the harness: tokenmill's packed encoder against sentence-transformers ``encode`` on the
same texts in the same process, plus ANN index build time per 100,000 vectors.

Texts: a few thousand of mixed lengths (3 to ~400 tokens, some beyond the model's 256-token limit), generated from a
fixed seed. Both engines get the same strings and truncate the same way; both time tokenisation + forward + pooling.
sentence-transformers sorts by length and pads each batch to its longest text; its padding share is computed from
its own tokeniser's lengths.
"""

from __future__ import annotations

import time

import numpy as np

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more about time "
         "river market engine theory violin harbour protein ledger glacier mosaic tribunal orbit lantern syntax "
         "meadow cipher falcon quartz bakery parliament satellite vaccine opera algorithm monsoon").split()


def make_texts(n: int, seed: int = 0, max_words: int = 300) -> list[str]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.8, sigma=0.9, size=n), 1, max_words).astype(int)
    return [" ".join(rng.choice(WORDS, size=int(k))).capitalize() + "." for k in lengths]


def st_padding_fraction(token_lens: list[int], batch_size: int) -> float:
    """Padding share of the positions sentence-transformers computes: it sorts by length, pads each batch."""
    lens = sorted(token_lens, reverse=True)
    computed = sum(max(lens[i:i + batch_size]) * len(lens[i:i + batch_size]) for i in range(0, len(lens), batch_size))
    return 1 - sum(lens) / computed


def build_times(dim: int, n: int, seed: int = 0) -> list[dict]:
    """Build time and recall@10 (200 held-out queries) of each index kind on ``n`` unit vectors: a few hundred
    cluster centres plus noise, so neighbourhoods are structured as real embeddings are."""
    from tokenmill.embed.index import INDEX_KINDS, build_faiss_index, recall_at_k

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(4, n // 300), dim)).astype(np.float32)
    pts = centres[rng.integers(0, len(centres), n + 200)] + 0.6 * rng.standard_normal((n + 200, dim)).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    vectors, queries = np.ascontiguousarray(pts[:n]), np.ascontiguousarray(pts[n:])
    rows = []
    for kind in INDEX_KINDS:
        t0 = time.perf_counter()
        index = build_faiss_index(vectors, kind, metric_ip=True, seed=seed)
        build = time.perf_counter() - t0
        t0 = time.perf_counter()
        recall = recall_at_k(index, vectors, queries, 10, metric_ip=True)
        rows.append({"kind": kind, "vectors": n, "build_s": build, "build_s_per_100k": build * 100_000 / n,
                     "recall_at_10": recall, "search_ms_per_query": 1000 * (time.perf_counter() - t0) / len(queries)})
    return rows


def run_embed_section(quick: bool) -> dict:
    from sentence_transformers import SentenceTransformer

    from tokenmill.embed.embedder import Embedder

    import torch

    texts = make_texts(40 if quick else 3000)
    t0 = time.perf_counter()
    emb = Embedder()
    load_s = time.perf_counter() - t0
    token_lens = [len(t.token_ids) for t in emb.tokenize(texts)]
    num_tokens = sum(token_lens)

    def timed(fn) -> float:
        fn(texts[:16])  # warm-up (thread pools, allocator)
        t0 = time.perf_counter()
        fn(texts)
        return time.perf_counter() - t0

    from tokenmill.model import gemm

    rows = []
    vectors = {}
    gemm_default = gemm.check_backend("onednn")
    # the two shipped paths, then float32 with aten's (MKL) GEMMs as an ablation of model/gemm.py
    for dt, e, backend in (("float32", emb, gemm_default), ("bfloat16", Embedder(dtype="bfloat16"), gemm_default),
                           ("float32", emb, "aten")):
        gemm.set_gemm_backend(e.net, backend)
        key = dt if backend == gemm_default else f"{dt}-{backend}"
        wall = timed(lambda t: vectors.__setitem__(key, e.encode(t)))
        rows.append({"engine": f"tokenmill {dt} (packed, max_batch_tokens={e.max_batch_tokens}, {backend} GEMMs)",
                     "dtype": dt, "wall_s": wall, "texts_s": len(texts) / wall, "tok_s": num_tokens / wall,
                     "padding": e.padding_fraction})
    gemm.set_gemm_backend(emb.net, gemm_default)
    st_runs = [("float32", 32)] if quick else [("float32", 32), ("float32", 16), ("float32", 64), ("float32", 128),
                                                ("bfloat16", 16), ("bfloat16", 32)]
    models = {}
    for dt, bs in st_runs:
        if dt not in models:
            models[dt] = SentenceTransformer(str(emb.path), device="cpu", model_kwargs={"dtype": getattr(torch, dt)})
        st = models[dt]
        wall = timed(lambda t: vectors.__setitem__(f"st-{dt}", st.encode(t, batch_size=bs, convert_to_numpy=True)))
        rows.append({"engine": f"sentence-transformers {dt} encode batch_size={bs}"
                               f"{' (default)' if bs == 32 and dt == 'float32' else ''}", "dtype": dt,
                     "wall_s": wall, "texts_s": len(texts) / wall, "tok_s": num_tokens / wall,
                     "padding": st_padding_fraction(token_lens, bs)})
    st_rows = [r for r in rows if r["engine"].startswith("sentence")]
    for r in rows[:3]:
        same = [s for s in st_rows if s["dtype"] == r["dtype"]] or st_rows
        r["vs_best_sentence_transformers"] = r["texts_s"] / max(s["texts_s"] for s in st_rows)
        r["vs_best_sentence_transformers_same_dtype"] = r["texts_s"] / max(s["texts_s"] for s in same)
    ours, ref = vectors["float32"], vectors["st-float32"]
    cos16 = (vectors["bfloat16"] * ref).sum(1) / np.linalg.norm(vectors["bfloat16"], axis=1) / np.linalg.norm(ref, axis=1)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    return {"texts": len(texts), "tokens": num_tokens, "truncated": sum(n >= emb.max_seq_length for n in token_lens),
            "load_s": load_s, "min_cosine_vs_st": float(cos.min()), "min_cosine_bf16_vs_st": float(cos16.min()),
            "rows": rows,
            "index": build_times(emb.dim, 2000 if quick else 100_000)}


def markdown(section: dict) -> list[str]:
    lines = ["### embed", "", f"{section['texts']} texts, {section['tokens']:,} tokens after truncation "
             f"({section['truncated']} texts cut at 256); min cosine tokenmill vs sentence-transformers "
             f"{section['min_cosine_vs_st']:.6f} (float32), {section['min_cosine_bf16_vs_st']:.6f} (tokenmill bfloat16); "
             f"tokenmill load {section['load_s']:.2f} s", "",
             "| engine | wall s | texts/s | tokens/s | padding | vs best s-t (any dtype) | vs best s-t (same dtype) |",
             "|---|---|---|---|---|---|---|"]
    for r in section["rows"]:
        vs = f"{r['vs_best_sentence_transformers']:.2f}x" if "vs_best_sentence_transformers" in r else ""
        vs2 = f"{r['vs_best_sentence_transformers_same_dtype']:.2f}x" if vs else ""
        lines.append(f"| {r['engine']} | {r['wall_s']:.1f} | {r['texts_s']:.1f} | {r['tok_s']:.0f} | "
                     f"{100 * r['padding']:.1f}% | {vs} | {vs2} |")
    lines += ["", "| index | vectors | build s | build s per 100k | recall@10 | search ms/query |",
              "|---|---|---|---|---|---|"]
    for r in section["index"]:
        lines.append(f"| {r['kind']} | {r['vectors']:,} | {r['build_s']:.2f} | {r['build_s_per_100k']:.2f} | "
                     f"{r['recall_at_10']:.4f} | {r['search_ms_per_query']:.3f} |")
    return lines + [""]
