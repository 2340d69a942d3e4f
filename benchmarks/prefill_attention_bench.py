"""Prefill attention of one chunk over the paged fp8 cache, one layer, through each C++ path that can take it:
AMX tiles with bfloat16 queries, AMX tiles with float32 queries (three bfloat16 parts each: exact products), and the
vector-unit tiles with float32 queries. Same cache, same process, alternating rounds, best of each.

    python benchmarks/prefill_attention_bench.py [--chunks 2048:0,1024:1024,512:1536] [--rounds 5]

Each chunk is NEW:CACHED (new tokens after that many cached ones, one request). SmolLM2's heads by default (9 query
heads, 3 KV heads, head_dim 64). Prints ms per call for each path and the float32 paths' largest difference. The AMX
paths run only where ``amx_available()``; elsewhere the AMX rows are the vector tiles again (the entry falls back).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenmill.kernels import cpu_kernel


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", default="2048:0,1024:1024,512:1536")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    k = cpu_kernel.load()
    if k is None:
        raise SystemExit(f"the C++ kernels are not available: {cpu_kernel.build_error()}")
    torch.manual_seed(0)
    bs, min_q, scale = 16, 16, a.head_dim**-0.5
    rows = []
    for spec in a.chunks.split(","):
        new, cached = (int(x) for x in spec.split(":"))
        nb = -(-(new + cached) // bs)
        kc = (torch.randn(nb, bs, a.kv_heads, a.head_dim) * 0.5).to(torch.float8_e4m3fn)
        vc = (torch.randn(nb, bs, a.kv_heads, a.head_dim) * 0.5).to(torch.float8_e4m3fn)
        meta = (torch.randperm(nb).long().unsqueeze(0), torch.tensor([new + cached]), torch.tensor([0, new]))
        q = torch.randn(new, a.heads, a.head_dim)
        qb = q.bfloat16()
        paths = {
            "amx_bfloat16": lambda: k.paged_attention_amx(qb, kc, vc, *meta, scale, min_q, 0, 0.0),
            "amx_float32": lambda: k.paged_attention_amx(q, kc, vc, *meta, scale, min_q, 0, 0.0),
            "vector_tiles_float32": lambda: k.paged_attention_tiled(q, kc, vc, *meta, scale, min_q),
        }
        for fn in paths.values():  # warm-up: scratch buffers, pages
            fn()
        best = {name: float("inf") for name in paths}
        for _ in range(a.rounds):  # alternating: a drift of the machine touches every path alike
            for name, fn in paths.items():
                best[name] = min(best[name], _ms(fn))
        diff = (paths["amx_float32"]() - paths["vector_tiles_float32"]()).abs().max().item()
        rows.append({"new": new, "cached": cached, **{f"{n}_ms": round(v, 2) for n, v in best.items()},
                     "float32_max_diff": diff})
    print(json.dumps({"amx": bool(k.amx_available()), "heads": a.heads, "kv_heads": a.kv_heads,
                      "head_dim": a.head_dim, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
