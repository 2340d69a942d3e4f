"""Swap against recompute preemption: one workload through a KV pool too small for its running requests, under
``preemption_mode="recompute"`` and ``"swap"``, alternating in one process (SmolLM2, the machine's default dtype).

    python benchmarks/swap_bench.py [--num-prompts 48] [--prompt-len 600] [--max-tokens 96] [--num-kv-blocks 320]
                                    [--rounds 2] [--dtype float32] [--out benchmarks/runs]

Recompute redoes a victim's whole prompt (and what it generated) as a prefill; swap copies its blocks out and back.
Reported per mode: wall time, output tok/s, preemptions, swaps, prefill tokens scheduled (recompute's extra work) and
the greedy outputs' equality between the modes (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import machine_info  # noqa: E402


def run(llm_cls, params_cls, mode: str, prompts: list[list[int]], args) -> dict:
    llm = llm_cls(dtype=args.dtype, num_kv_blocks=args.num_kv_blocks, max_num_seqs=args.max_num_seqs,
                  max_model_len=args.prompt_len + args.max_tokens,
                  max_num_batched_tokens=args.max_num_batched_tokens, preemption_mode=mode, swap_space=args.swap_space,
                  enable_prefix_caching=False)
    params = params_cls(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    st = llm.engine.stats
    return {"mode": mode, "wall_s": round(wall, 2), "output_tok_s": round(len(prompts) * args.max_tokens / wall, 1),
            "preemptions": st.num_preemptions, "swap_outs": st.num_swap_outs,
            "prefill_tokens": st.num_prefill_tokens, "tokens": [o.token_ids for o in outs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--num-kv-blocks", type=int, default=320)  # 5,120 slots: ~7 of 48 requests at their full length
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=1024)
    ap.add_argument("--swap-space", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from tokenmill import LLM, SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
    results = []
    for r in range(args.rounds):
        for mode in ("recompute", "swap") if r % 2 == 0 else ("swap", "recompute"):
            res = run(LLM, SamplingParams, mode, prompts, args)
            res["round"] = r
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
    by_mode = {m: [x for x in results if x["mode"] == m] for m in ("recompute", "swap")}
    same = all(x["tokens"] == results[0]["tokens"] for x in results)
    best = {m: max(x["output_tok_s"] for x in xs) for m, xs in by_mode.items()}
    report = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "outputs_equal": same,
              "best_output_tok_s": best, "swap_over_recompute": round(best["swap"] / best["recompute"], 3),
              "runs": [{k: v for k, v in x.items() if k != "tokens"} for x in results]}
    print(json.dumps({k: report[k] for k in ("outputs_equal", "best_output_tok_s", "swap_over_recompute")}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"swap-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
