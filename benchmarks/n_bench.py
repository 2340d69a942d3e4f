"""Parallel sampling: ``n`` samples per prompt on workload W's prompts (SmolLM2, float32), tokenmill with ``n`` on
one request (the samples share the prompt's KV: prefilled once, through the prefix cache) against the same prompts
sent as ``n`` separate requests each with prefix caching off, side by side, alternating, best of the rounds.
Sampling at temperature 1 with EOS ignored, so both sides generate exactly num_prompts x n x output_len tokens.

    python benchmarks/n_bench.py [--num-prompts 16] [--n 8] [--output-len 128] [--rounds 2]

The figure is generated tokens per second (the issue's target: n = 8 at >= 1.5x the separate requests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import machine_info  # noqa: E402
from benchmarks.workloads import workload_w  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from tokenmill import LLM, SamplingParams

    shared = LLM(dtype="float32", enable_prefix_caching=True)
    separate = LLM(dtype="float32", enable_prefix_caching=False)
    prompts = workload_w(shared.tokenizer, num_prompts=args.num_prompts).prompts
    sample = dict(max_tokens=args.output_len, temperature=1.0, ignore_eos=True)
    best = {"n on one request": 1e9, "separate requests, no prefix cache": 1e9}
    generated = {}
    for r in range(args.rounds):
        shared.engine.reset_prefix_cache()  # every round starts cold
        t0 = time.perf_counter()
        outs = shared.generate(prompts, [SamplingParams(**sample, n=args.n, seed=r * 1000 + i)
                                         for i in range(len(prompts))], use_tqdm=False)
        best["n on one request"] = min(best["n on one request"], time.perf_counter() - t0)
        generated["n on one request"] = sum(o.num_completion_tokens for o in outs)
        t0 = time.perf_counter()
        outs = separate.generate([p for p in prompts for _ in range(args.n)],
                                 [SamplingParams(**sample, seed=r * 1000 + i) for i in range(len(prompts) * args.n)],
                                 use_tqdm=False)
        best["separate requests, no prefix cache"] = min(best["separate requests, no prefix cache"],
                                                         time.perf_counter() - t0)
        generated["separate requests, no prefix cache"] = sum(o.num_completion_tokens for o in outs)
    assert len(set(generated.values())) == 1, generated
    tok_s = {k: round(generated[k] / v, 1) for k, v in best.items()}
    result = {"machine": machine_info(), "prompts": len(prompts), "n": args.n, "output_len": args.output_len,
              "prompt_tokens": sum(len(p) for p in prompts), "generated_tokens": generated["n on one request"],
              "seconds": {k: round(v, 2) for k, v in best.items()}, "generated_tok_s": tok_s,
              "speedup": round(best["separate requests, no prefix cache"] / best["n on one request"], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
