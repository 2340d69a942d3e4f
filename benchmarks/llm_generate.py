"""LLM.generate throughput on SmolLM2-135M-Instruct: N chat prompts of mixed length, fixed output length.

    python benchmarks/llm_generate.py --num-prompts 64 --max-tokens 128 [--option key=value ...]

Prints load time (process start to engine ready), the first step's latency, prompt / output / total tok/s and the
process's peak RSS.
"""

from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there data model batch token river mountain city light music paper").split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--option", action="append", default=[], help="engine option key=value (JSON value)")
    args = ap.parse_args()
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}

    from tokenmill import LLM, SamplingParams

    llm = LLM(**options)
    t_ready = time.perf_counter()
    rng = random.Random(0)
    convs = [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 150)))}]
             for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    first = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1), use_tqdm=False)  # noqa: F841 (first step)
    t_first_step = time.perf_counter()
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    p = sum(o.num_prompt_tokens for o in outs)
    g = sum(o.num_completion_tokens for o in outs)
    st = llm.engine.stats
    print(json.dumps({
        "process_start_to_ready_s": round(t_ready - T_PROCESS, 2),
        "process_start_to_first_step_done_s": round(t_first_step - T_PROCESS, 2),
        "engine_load_s": round(llm.engine.load_seconds, 2),
        "num_prompts": len(outs), "prompt_tokens": p, "output_tokens": g, "wall_s": round(wall, 2),
        "output_tok_s": round(g / wall, 1), "total_tok_s": round((p + g) / wall, 1),
        "steps": st.num_steps, "avg_batch": round(st.avg_batch_size, 1), "preemptions": st.num_preemptions,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "options": options,
    }))


if __name__ == "__main__":
    main()
