"""Peak RSS of `tokenmill run` as the input grows: memory must stay flat (streamed input, bounded window).

Runs real `tokenmill run` subprocesses on inputs of N lines and reports each one's peak RSS (ru_maxrss). The model
is a tiny random-weight Llama written to a temporary directory (the job machinery is what is measured; SmolLM2
would take hours on 200,000 rows on this CPU), max_tokens=2.

    python benchmarks/job_memory.py 2000 200000
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def write_input(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(f"w{rng.randrange(3, 256)}" for _ in range(rng.randint(4, 24)))
            f.write(json.dumps({"id": f"row-{i}", "prompt": words}) + "\n")


# A fresh wrapper process per run, so RUSAGE_CHILDREN's peak belongs to that run alone.
_WRAPPER = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t0)
"""


def peak_rss_of_run(model_dir: Path, inp: Path, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "tokenmill.cli", "run", str(inp), "-o", str(out), "--model", str(model_dir),
           "--max-tokens", "2", "--temperature", "0", "--quiet", "--kv-cache-memory", "0.25"]
    res = subprocess.run([sys.executable, "-c", _WRAPPER, *cmd], check=True, capture_output=True, text=True)
    rss_kib, wall = res.stdout.split()
    return int(rss_kib) / 1024, float(wall)


def main() -> None:
    from helpers import save_tiny_model

    sizes = [int(a) for a in sys.argv[1:]] or [2000, 200000]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_tiny_model("llama", d / "model")
        rows = []
        for n in sorted(sizes):
            inp = d / f"in{n}.jsonl"
            write_input(inp, n)
            rss, wall = peak_rss_of_run(d / "model", inp, d / f"out{n}.jsonl")
            lines = sum(1 for _ in open(d / f"out{n}.jsonl"))
            rows.append((n, rss, wall, lines))
            print(f"{n:>8} lines: peak RSS {rss:8.1f} MiB, {wall:7.1f} s, {lines} results", flush=True)
        base = rows[0][1]
        for n, rss, _, _ in rows[1:]:
            print(f"{n} lines vs {rows[0][0]}: peak RSS {100 * (rss - base) / base:+.1f}%")


if __name__ == "__main__":
    main()
