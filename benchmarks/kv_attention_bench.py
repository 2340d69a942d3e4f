"""Decode attention alone, by KV-cache dtype: one decode step of a W-like batch (SmolLM2's heads: 9 query heads, 3 KV
heads, head_dim 64; 128 sequences of 96..320 cached tokens in scattered blocks of 16) through every layer's own cache,
so each step reads the caches from memory as an engine step does.

    python benchmarks/kv_attention_bench.py [--rounds 4] [--layers 30] [--q-dtype bfloat16]

Prints the milliseconds of one 30-layer step per cache dtype (the model's bfloat16, and float8 e4m3), alternating
round by round, and the bytes read per step; the C++ kernel the engine runs (``paged_attention``).
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--seqs", type=int, default=128)
    ap.add_argument("--q-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    from tokenmill.kernels import cpu_kernel

    kernels = cpu_kernel.load()
    if kernels is None:
        raise SystemExit("the C++ kernels are not available here")
    torch.manual_seed(0)
    rng = random.Random(0)
    heads, kv_heads, head_dim, bs = 9, 3, 64, 16
    lens = [rng.randint(32, 256) + 64 for _ in range(args.seqs)]
    nblocks = [-(-n // bs) for n in lens]
    total, width = sum(nblocks) + 1, max(nblocks)
    model_dtype = getattr(torch, args.q_dtype)
    caches: dict[str, list] = {args.q_dtype: [], "fp8": []}  # the model's dtype, and float8 e4m3
    for _ in range(args.layers):
        k = torch.randn(total, bs, kv_heads, head_dim).to(model_dtype)
        v = torch.randn(total, bs, kv_heads, head_dim).to(model_dtype)
        perm = torch.randperm(total - 1) + 1  # scattered blocks, as a busy pool leaves them
        table, used = torch.zeros(args.seqs, width, dtype=torch.int64), 0
        for i, n in enumerate(nblocks):
            table[i, :n] = perm[used:used + n]
            used += n
        caches[args.q_dtype].append((k, v, table))
        caches["fp8"].append((k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), table))
    q = torch.randn(args.seqs, heads, head_dim).to(model_dtype)
    seq_lens, qsl = torch.tensor(lens), torch.arange(args.seqs + 1)
    for name, layers in caches.items():
        k = layers[0][0]
        print(f"{name}: {sum(lens) * kv_heads * head_dim * 2 * k.element_size() * args.layers / 1e6:.0f} MB of K/V "
              f"read per step")
    best = {name: float("inf") for name in caches}
    for r in range(args.rounds):
        for name, layers in caches.items():
            t0 = time.perf_counter()
            for k, v, table in layers:
                kernels.paged_attention(q, k, v, table, seq_lens, qsl, 0.125)
            ms = (time.perf_counter() - t0) * 1e3
            best[name] = min(best[name], ms)
            print(f"round {r} {name}: {ms:.1f} ms per {args.layers}-layer step", flush=True)
    print("best: " + ", ".join(f"{n} {ms:.1f} ms" for n, ms in best.items()))


if __name__ == "__main__":
    main()
