"""Structured outputs, side by side in one run on SmolLM2-135M (float32, greedy): a schema-extraction workload.

256 rows, each a short synthetic profile ("Maria Lopez, 34, works as a nurse in Lyon and is not a student.") to
extract as JSON with a schema of typed fields and an enum (``SCHEMA``), 64 output tokens at most.

- Through ``tokenmill run`` (the whole command): the prompt asks for JSON, unconstrained vs ``--json-schema``:
  the share of rows whose output parses and validates (``jsonschema``), and tok/s.
- The mask's own cost, through ``LLM.chat``: the constrained rows, then the same prompts unconstrained with each
  row's ``max_tokens`` set to the constrained output's length and ``ignore_eos``, so both generate exactly the same
  number of tokens; alternating, best of ``--repeats``. Overhead = 1 - constrained tok/s / unconstrained tok/s.

``python -m benchmarks.structured_bench --out benchmarks/results [--rows 256] [--repeats 2]``; writes
``structured.json`` and ``structured.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import jsonschema

from benchmarks.cli_run import run_cli
from tokenmill import LLM, SamplingParams

JOBS = ["nurse", "teacher", "engineer", "chef", "pilot", "lawyer", "farmer", "artist", "doctor", "driver"]
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "occupation", "city", "is_student"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "occupation": {"enum": JOBS}, "city": {"type": "string", "maxLength": 30},
                         "is_student": {"type": "boolean"}}}
FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Raj", "Sofia", "Pierre", "Chen", "Amara", "Ivan", "Lucia"]
LAST = ["Lopez", "Smith", "Tanaka", "Haddad", "Novak", "Patel", "Rossi", "Martin", "Wei", "Okafor", "Petrov", "Silva"]
CITIES = ["Lyon", "Osaka", "Cairo", "Lagos", "Lima", "Oslo", "Pune", "Quito", "Turin", "Austin", "Hanoi", "Perth"]


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        student = rng.random() < 0.3
        text = (f"{rng.choice(FIRST)} {rng.choice(LAST)}, {rng.randint(18, 80)}, works as a {rng.choice(JOBS)} in "
                f"{rng.choice(CITIES)} and is {'a' if student else 'not a'} student.")
        ask = ("Extract name, age, occupation, city and is_student from this text as a JSON object, and output only "
               f"the JSON: {text}")
        out.append({"id": i, "messages": [{"role": "user", "content": ask}], "max_tokens": 64})
    return out


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


def run_job(data: list[dict], tmp: Path, extra: list[str]) -> dict:
    src = tmp / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in data))
    out = tmp / f"out{len(list(tmp.iterdir()))}.jsonl"
    r = run_cli(src, out, "--temperature", 0, *extra)
    prompt, gen = r.summary_tokens()
    wall = r.wall_s
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    return {"wall_s": wall, "tok_s": (prompt + gen) / wall, "output_tok_s": gen / wall, "output_tokens": gen,
            "valid": sum(valid(r["completion"]) for r in recs) / len(recs),
            "length": sum(r["finish_reason"] == "length" for r in recs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    data = rows(a.rows)
    res: dict = {"rows": a.rows}
    with tempfile.TemporaryDirectory(prefix="tokenmill-structured-bench-") as tmp:
        schema = Path(tmp) / "schema.json"
        schema.write_text(json.dumps(SCHEMA))
        work = Path(tmp) / "jobs"
        work.mkdir()
        res["run"] = {"unconstrained": run_job(data, work, []),
                      "--json-schema": run_job(data, work, ["--json-schema", str(schema)])}
    llm = LLM()
    msgs = [r["messages"] for r in data]
    sp = SamplingParams(max_tokens=64, temperature=0, structured={"json": SCHEMA})
    lengths = [len(o.token_ids) for o in llm.chat(msgs, sp, use_tqdm=False)]  # also warms the grammar cache
    free = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths]
    timing: dict = {"constrained": [], "unconstrained, same lengths": []}
    for _ in range(a.repeats):
        for name, params in (("unconstrained, same lengths", free), ("constrained", [sp] * len(msgs))):
            llm.engine.reset_prefix_cache()
            t0 = time.perf_counter()
            outs = llm.chat(msgs, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            assert [len(o.token_ids) for o in outs] == lengths
            timing[name].append({"wall_s": wall, "output_tok_s": sum(lengths) / wall})
    res["mask_cost"] = timing
    best = {k: max(x["output_tok_s"] for x in v) for k, v in timing.items()}
    res["overhead"] = 1 - best["constrained"] / best["unconstrained, same lengths"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res["commit"] = commit
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "structured.json").write_text(json.dumps(res, indent=1))
    lines = [f"### Structured outputs (commit {commit}, {a.rows} rows)", "",
             "| tokenmill run | wall (s) | total tok/s | output tok/s | output tokens | valid JSON (schema) "
             "| cut by max_tokens |",
             "|---|---|---|---|---|---|---|"]
    for k, r in res["run"].items():
        lines.append(f"| {k} | {r['wall_s']:.1f} | {r['tok_s']:.1f} | {r['output_tok_s']:.1f} | {r['output_tokens']} | "
                     f"{100 * r['valid']:.1f}% | {r['length']} |")
    lines += ["", f"| LLM.chat, same output tokens ({sum(lengths)}), best of {a.repeats} | output tok/s |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in best.items()]
    lines += ["", f"mask overhead: {100 * res['overhead']:.1f}%"]
    (a.out / "structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
