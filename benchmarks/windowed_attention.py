"""Gemma-style decode attention (a sliding window and capped scores) through the C++ per-token kernel against the
torch batched path that handled such layers before (``attention/backend.TorchPagedAttention``), one step in one
process, alternating.

    python benchmarks/windowed_attention.py [--head-dim 256] [--seqs 32] [--context 600] [--window 256]

Gemma 2 2B's shape by default: 8 query heads, 4 KV heads, head_dim 256, bfloat16, softcap 50, and a window shorter
than the context so the window bites. Prints ms per decode step of one layer for each path and their ratio.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenmill.attention.backend import AttentionMetadata, TorchPagedAttention
from tokenmill.kernels import cpu_kernel
from tokenmill.ops.cpu_ops import CpuKernelAttention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--softcap", type=float, default=50.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.manual_seed(0)
    heads, kv_heads, bs, dtype = 8, 4, 16, torch.bfloat16
    nb = -(-a.context // bs)
    k_cache = torch.randn(a.seqs * nb + 1, bs, kv_heads, a.head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables = (torch.arange(a.seqs * nb) + 1).view(a.seqs, nb)  # block 0 pads
    seq_lens = [a.context] * a.seqs
    q = torch.randn(a.seqs, heads, a.head_dim).to(dtype)
    k, v = torch.randn(a.seqs, kv_heads, a.head_dim).to(dtype), torch.randn(a.seqs, kv_heads, a.head_dim).to(dtype)
    slots = tables[:, -1] * bs + (a.context - 1) % bs
    meta = AttentionMetadata(list(range(a.seqs + 1)), seq_lens, a.seqs, slots, tables, torch.tensor(seq_lens))
    kernel = CpuKernelAttention(cpu_kernel.load())
    scale = a.head_dim**-0.5
    reference = TorchPagedAttention()
    paths = {"cpu_kernel": lambda: kernel.forward(q, k, v, k_cache, v_cache, meta, scale, a.window, a.softcap),
             "torch": lambda: reference.forward(q, k, v, k_cache, v_cache, meta, scale, a.window, a.softcap)}
    best = {name: float("inf") for name in paths}
    for _ in range(a.rounds):
        for name, fn in paths.items():
            fn()
            t = time.perf_counter()
            for _ in range(5):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / 5 * 1e3)
    print(json.dumps({"args": vars(a), "ms_per_step": {n: round(v, 2) for n, v in best.items()},
                      "torch_over_kernel": round(best["torch"] / best["cpu_kernel"], 1)}))


if __name__ == "__main__":
    main()
