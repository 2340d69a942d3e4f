"""Prefix caching, side by side in one run on SmolLM2-135M (float32, greedy, ``ignore_eos``), ``LLM.generate``:

- W0 (the cost when nothing is shared): W's lengths (32-256 prompt tokens, 128 output tokens, 128 requests) but
  random token ids, so no block ever hits; caching off vs on, alternating, best of ``--repeats``.
- P (few-shot style): 256 requests, 8 distinct ~1,000-token preambles, a unique 16-64-token question each, 32 output
  tokens, rows shuffled; caching off, on, and on with the rows grouped by preamble (what dataset-aware ordering does).
- D (duplicate-heavy): W's prompts with 30% of the rows exact duplicates of others, shuffled; off vs on.

``python -m benchmarks.prefix_bench --out benchmarks/results [--repeats 2]``; writes ``prefix.json`` and ``prefix.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from pathlib import Path

from benchmarks.workloads import WORDS, workload_w
from tokenmill import LLM, SamplingParams


def run(prompts, max_tokens, caching: bool, llms: dict) -> dict:
    if caching not in llms:
        llms[caching] = LLM(enable_prefix_caching=caching)
    llm = llms[caching]
    st = llm.engine.stats
    q0, h0 = st.prefix_cache_queries, st.prefix_cache_hits
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(p) for p in prompts) + sum(len(o.token_ids) for o in outs)
    q, h = st.prefix_cache_queries - q0, st.prefix_cache_hits - h0
    llm.engine.reset_prefix_cache()  # every run starts cold
    return {"wall_s": wall, "tok_s": tokens / wall, "hit_rate": h / q if q else 0.0,
            "texts": [o.token_ids for o in outs]}


def workload_p(tok, rng: random.Random, n: int = 256, preambles: int = 8):
    heads = []
    for k in range(preambles):
        shots = " ".join(f"Q: {' '.join(rng.choice(WORDS) for _ in range(12))}? A: {rng.choice(WORDS)}." for _ in
                         range(45))
        heads.append(tok(f"Examples set {k}. {shots}\n", add_special_tokens=False).input_ids[:1000])
    rows = []
    for i in range(n):
        q = tok(f"Q: {' '.join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))}? A:",
                add_special_tokens=False).input_ids[:64]
        rows.append((i % preambles, heads[i % preambles] + q))
    rng.shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    llms: dict = {}
    tok = LLM(kv_cache_memory=0.5).tokenizer
    rng = random.Random(0)
    w = workload_w(tok)
    w0 = [[rng.randrange(1000, 40000) for _ in range(len(p))] for p in w.prompts]
    res: dict = {"W0": {"off": [], "on": []}}
    for _ in range(a.repeats):
        for caching in (False, True):
            r = run(w0, w.output_lens, caching, llms)
            res["W0"]["on" if caching else "off"].append({k: v for k, v in r.items() if k != "texts"})
    p_rows = workload_p(tok, random.Random(1))
    prompts = [p for _, p in p_rows]
    ordered = sorted(range(len(p_rows)), key=lambda i: p_rows[i][0])
    res["P"] = {}
    p_off = run(prompts, [32] * len(prompts), False, llms)
    p_on = run(prompts, [32] * len(prompts), True, llms)
    p_ord = run([prompts[i] for i in ordered], [32] * len(prompts), True, llms)
    same = p_off["texts"] == p_on["texts"] and [p_off["texts"][i] for i in ordered] == p_ord["texts"]
    for name, r in (("off", p_off), ("on", p_on), ("on + grouped by preamble", p_ord)):
        res["P"][name] = {k: v for k, v in r.items() if k != "texts"}
    dup_src = list(w.prompts)
    d_prompts = dup_src + [dup_src[rng.randrange(len(dup_src))] for _ in range(round(len(dup_src) * 0.3 / 0.7))]
    rng.shuffle(d_prompts)
    d_off = run(d_prompts, [128] * len(d_prompts), False, llms)
    d_on = run(d_prompts, [128] * len(d_prompts), True, llms)
    res["D"] = {"off": {k: v for k, v in d_off.items() if k != "texts"},
                "on": {k: v for k, v in d_on.items() if k != "texts"}}
    res["outputs_identical_P"] = same
    res["outputs_identical_D"] = d_off["texts"] == d_on["texts"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res["commit"] = commit
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prefix.json").write_text(json.dumps(res, indent=1))
    best = {k: max(x["tok_s"] for x in v) for k, v in res["W0"].items()}
    lines = [f"### Prefix caching (commit {commit})", "",
             "| workload | setting | wall (s) | total tok/s | hit rate | vs off |", "|---|---|---|---|---|---|"]
    for k in ("off", "on"):
        r = max(res["W0"][k], key=lambda x: x["tok_s"])
        lines.append(f"| W0 (no sharing), best of {a.repeats} | {k} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                     f"{100 * r['hit_rate']:.1f}% | {r['tok_s'] / best['off']:.3f}x |")
    for wl in ("P", "D"):
        base = res[wl]["off"]["tok_s"]
        for k, r in res[wl].items():
            lines.append(f"| {wl} | {k} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | {100 * r['hit_rate']:.1f}% | "
                         f"{r['tok_s'] / base:.2f}x |")
    lines += ["", f"greedy outputs identical with caching on/off: P {same}, D {res['outputs_identical_D']}"]
    (a.out / "prefix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
