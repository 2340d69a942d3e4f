"""Prefix caching, dataset ordering and dedupe, side by side in one run on SmolLM2-135M (float32, greedy):

- W0 (the cost when nothing is shared), ``LLM.generate``: W's lengths (32-256 prompt tokens, 128 output tokens, 128
  requests, ``ignore_eos``) but random token ids, so no block ever hits; caching off vs on, alternating, best of
  ``--repeats``.
- Through ``tokenmill run`` (the whole command: validation pass, model load, job; rows as token-id prompts), three
  settings: neither (``--no-prefix-caching --dataset-order input --no-dedupe``), caching only (``--dataset-order
  input --no-dedupe``) and the default (caching, dataset ordering, dedupe):
  - P (few-shot style): 256 rows, 8 distinct ~1,000-token preambles, a unique 16-64-token question each, 32 output
    tokens, rows shuffled.
  - P-big (a dataset larger than the cache): 48 preambles of ~500 tokens x 6 questions, shuffled, with a KV cache of
    ~1 GiB (about 21,000 tokens: a third of the preambles), so what an online engine's queue sees is not enough.
  - D (duplicate-heavy): W's prompts with 30% of the rows exact duplicates of others, shuffled, 128 output tokens.

``python -m benchmarks.prefix_bench --out benchmarks/results [--repeats 2]``; writes ``prefix.json`` and ``prefix.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.cli_run import run_cli
from benchmarks.workloads import WORDS, workload_w
from tokenmill import LLM, SamplingParams

SETTINGS = {
    "neither": ["--no-prefix-caching", "--dataset-order", "input", "--no-dedupe"],
    "caching only": ["--dataset-order", "input", "--no-dedupe"],
    "caching + ordering + dedupe": [],
}


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
    return {"wall_s": wall, "tok_s": tokens / wall, "hit_rate": h / q if q else 0.0}


def run_job(rows: list[dict], tmp: Path, name: str, extra: list[str]) -> dict:
    """One ``tokenmill run`` of ``rows``; wall of the whole command, and the job's own summary figures."""
    src = tmp / f"{name}.jsonl"
    if not src.exists():
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / f"{name}.{len(list(tmp.iterdir()))}.out.jsonl"
    r = run_cli(src, out, "--temperature", 0, *extra)
    tokens = sum(r.summary_tokens())
    texts = {r["id"]: r["completion"] for r in map(json.loads, out.read_text().splitlines())}
    return {"wall_s": r.wall_s, "tok_s": tokens / r.wall_s,
            "job_tok_s": float(r.find(r"([\d.]+) tok/s total")),
            "hit_rate": float(r.find(r"\(([\d.]+)%\) came from the cache", 0)) / 100,
            "deduplicated": int(r.find(r"deduplicated: ([\d,]+) rows", "0").replace(",", "")),
            "ordered": "dataset order:" in r.stderr, "texts": texts}


def preamble_rows(tok, rng: random.Random, preambles: int, per_preamble: int, head_tokens: int, max_tokens: int):
    heads = []
    for k in range(preambles):
        shots = " ".join(f"Q: {' '.join(rng.choice(WORDS) for _ in range(12))}? A: {rng.choice(WORDS)}." for _ in
                         range(head_tokens // 20 + 5))
        heads.append(tok(f"Examples set {k}. {shots}\n", add_special_tokens=False).input_ids[:head_tokens])
    rows = []
    for i in range(preambles * per_preamble):
        q = tok(f"Q: {' '.join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))}? A:",
                add_special_tokens=False).input_ids[:64]
        rows.append({"id": i, "prompt": heads[i % preambles] + q, "max_tokens": max_tokens})
    rng.shuffle(rows)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", default="W0,P,P-big,D", help="comma-separated subset to run")
    a = ap.parse_args()
    chosen = a.workloads.split(",")
    llms: dict = {}
    tok = LLM(kv_cache_memory=0.5).tokenizer
    rng = random.Random(0)
    w = workload_w(tok)
    w0 = [[rng.randrange(1000, 40000) for _ in range(len(p))] for p in w.prompts]
    res: dict = {"W0": {"off": [], "on": []}}
    for _ in range(a.repeats if "W0" in chosen else 0):
        for caching in (False, True):
            res["W0"]["on" if caching else "off"].append(run(w0, w.output_lens, caching, llms))
    llms.clear()
    dup_src = list(w.prompts)
    d_prompts = dup_src + [dup_src[rng.randrange(len(dup_src))] for _ in range(round(len(dup_src) * 0.3 / 0.7))]
    rng.shuffle(d_prompts)
    workloads = {
        "P": (preamble_rows(tok, random.Random(1), 8, 32, 1000, 32), []),
        "P-big": (preamble_rows(tok, random.Random(2), 48, 6, 500, 32), ["--kv-cache-memory", "1"]),
        "D": ([{"id": i, "prompt": p, "max_tokens": 128} for i, p in enumerate(d_prompts)], []),
    }
    workloads = {k: v for k, v in workloads.items() if k in chosen}
    identical = {}
    with tempfile.TemporaryDirectory(prefix="tokenmill-prefix-bench-") as tmp:
        for name, (rows, extra) in workloads.items():
            res[name] = {k: run_job(rows, Path(tmp), name, extra + flags) for k, flags in SETTINGS.items()}
            texts = [r.pop("texts") for r in res[name].values()]
            identical[name] = all(t == texts[0] for t in texts)
            print(name, {k: round(v["tok_s"], 1) for k, v in res[name].items()}, flush=True)
    res["outputs_identical"] = identical
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res["commit"] = commit
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prefix.json").write_text(json.dumps(res, indent=1))
    best = {k: max(x["tok_s"] for x in v) for k, v in res["W0"].items()}
    lines = [f"### Prefix caching (commit {commit})", "",
             "| workload | setting | wall (s) | total tok/s | hit rate | deduplicated | vs neither |",
             "|---|---|---|---|---|---|---|"]
    for k in ("off", "on") if "W0" in chosen else ():
        r = max(res["W0"][k], key=lambda x: x["tok_s"])
        lines.append(f"| W0 (no sharing, LLM.generate), best of {a.repeats} | caching {k} | {r['wall_s']:.1f} | "
                     f"{r['tok_s']:.1f} | {100 * r['hit_rate']:.1f}% | - | {r['tok_s'] / best['off']:.3f}x |")
    for wl in workloads:
        base = res[wl]["neither"]["tok_s"]
        for k, r in res[wl].items():
            lines.append(f"| {wl} (tokenmill run) | {k} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | "
                         f"{100 * r['hit_rate']:.1f}% | {r['deduplicated']} | {r['tok_s'] / base:.2f}x |")
    lines += ["", "greedy outputs identical across the three settings: "
              + ", ".join(f"{k} {v}" for k, v in identical.items())]
    (a.out / "prefix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
