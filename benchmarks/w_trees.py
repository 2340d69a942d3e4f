"""W through ``LLM.generate`` of two checkouts, alternating, a fresh process per run (a before/after check of a change
on this noisy VM: compare per-pair ratios, never a single run).

    git worktree add /tmp/before <commit>
    python benchmarks/w_trees.py /tmp/before . --pairs 3 --dtype float32

Prints one JSON line per run (tree, dtype, output and total tok/s) and the per-pair ratios (second / first).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

_ONE_RUN = """
import json, sys
sys.path.insert(0, {tree!r})
from benchmarks.__main__ import run_tokenmill
from benchmarks.workloads import workload_w
from tokenmill import LLM
llm = LLM(None, dtype={dtype!r})
r = run_tokenmill(llm, workload_w(llm.tokenizer), {tree!r})
print(json.dumps({{"tree": {tree!r}, "dtype": {dtype!r}, "output_tok_s": round(r["output_tok_s"], 1),
                  "total_tok_s": round(r["total_tok_s"], 1)}}))
"""


def run_once(tree: str, dtype: str) -> dict:
    code = _ONE_RUN.format(tree=tree, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    trees = [str(Path(t).resolve()) for t in (args.before, args.after)]
    ratios = []
    for _ in range(args.pairs):
        pair = [run_once(t, args.dtype) for t in trees]
        for r in pair:
            print(json.dumps(r), flush=True)
        ratios.append(round(pair[1]["output_tok_s"] / pair[0]["output_tok_s"], 3))
    print(json.dumps({"per_pair_ratio": ratios}))


if __name__ == "__main__":
    main()
