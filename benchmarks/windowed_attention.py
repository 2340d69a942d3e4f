"""Gemma-style attention (a sliding window and capped scores) through the C++ kernels against the torch batched
path that handled such layers before (``attention/backend.TorchPagedAttention``), one step in one process,
alternating.

    python benchmarks/windowed_attention.py [--head-dim 256] [--seqs 32] [--context 600] [--window 256] [--prefill]

Gemma 2 2B's shape by default: 8 query heads, 4 KV heads, head_dim 256, bfloat16, softcap 50, and a window shorter
than the context so the window bites. A decode step by default (each sequence's last token after ``context``
cached ones); with ``--prefill`` each sequence is a prompt of ``context`` tokens in one chunk, and the C++ kernel runs
twice: as the engine runs it (``cpu_kernel``: prefill tiles, on AMX where the machine has it) and every token on its
own (``per_token``). Prints ms per step of one layer for each path and the ratios.
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
    ap.add_argument("--prefill", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    torch.manual_seed(0)
    heads, kv_heads, bs, dtype = 8, 4, 16, getattr(torch, a.dtype)
    nb = -(-a.context // bs)
    k_cache = torch.randn(a.seqs * nb + 1, bs, kv_heads, a.head_dim).to(dtype)
    v_cache = torch.randn_like(k_cache)
    tables = (torch.arange(a.seqs * nb) + 1).view(a.seqs, nb)  # block 0 pads
    seq_lens = [a.context] * a.seqs
    new = a.context if a.prefill else 1  # new tokens per sequence
    q = torch.randn(a.seqs * new, heads, a.head_dim).to(dtype)
    k, v = (torch.randn(a.seqs * new, kv_heads, a.head_dim).to(dtype) for _ in range(2))
    pos = torch.arange(a.context - new, a.context)
    slots = (tables[:, pos // bs] * bs + pos % bs).reshape(-1)
    meta = AttentionMetadata(list(range(0, a.seqs * new + 1, new)), seq_lens, 0 if a.prefill else a.seqs, slots,
                             tables, torch.tensor(seq_lens))
    kernels = cpu_kernel.load()
    scale = a.head_dim**-0.5
    paths = {"cpu_kernel": CpuKernelAttention(kernels, amx=kernels.amx_available()), "torch": TorchPagedAttention()}
    if a.prefill:
        paths["per_token"] = CpuKernelAttention(kernels, tiled=False)
    paths = {name: (lambda b=b: b.forward(q, k, v, k_cache, v_cache, meta, scale, a.window, a.softcap))
             for name, b in paths.items()}
    best = {name: float("inf") for name in paths}
    for _ in range(a.rounds):
        for name, fn in paths.items():
            fn()
            t = time.perf_counter()
            for _ in range(5):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / 5 * 1e3)
    ratios = {f"{n}_over_kernel": round(best[n] / best["cpu_kernel"], 1) for n in best if n != "cpu_kernel"}
    print(json.dumps({"args": vars(a), "ms_per_step": {n: round(v, 2) for n, v in best.items()}, **ratios}))


if __name__ == "__main__":
    main()
