"""The sampler alone on CPU logits: ms per call for four row mixes, this tree's sampler with the torch draws and with
the C++ kernels' (``CpuOps``: ``sample_plain``, ``sample_filtered``, ``argmax``), beside another revision's.

    python benchmarks/sampler_bench.py [--against 1c4d7c9] [--rows 64] [--vocab 49152] [--scale 4.0]

``--scale`` multiplies standard-normal logits (an LLM's rows are peaked: 4 keeps a top-p 0.95 nucleus within a few
hundred tokens; 1 is a flat row whose nucleus spans most of the vocabulary). Calls alternate between the two samplers.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenmill.model.sampler import Sampler  # noqa: E402
from tokenmill.sampling_params import SamplingParams  # noqa: E402


def sampler_at(rev: str):
    """The Sampler class of ``tokenmill/model/sampler.py`` at git revision ``rev``."""
    src = subprocess.run(["git", "show", f"{rev}:tokenmill/model/sampler.py"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"sampler_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = mod
    spec.loader.exec_module(mod)
    return mod.Sampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--against", default=None, help="a git revision whose sampler runs beside this tree's")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--scale", type=float, default=4.0)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    r = args.rows
    logits = torch.randn(r, args.vocab) * args.scale
    mixes = {
        "temperature 0.8": [SamplingParams(temperature=0.8)] * r,
        "top-p 0.95, seeded": [SamplingParams(temperature=0.8, top_p=0.95, seed=i) for i in range(r)],
        "top-k 50, seeded": [SamplingParams(temperature=0.8, top_k=50, seed=i) for i in range(r)],
        "greedy + 8 seeded": [SamplingParams(temperature=0.0)] * (r - 8)
                             + [SamplingParams(temperature=1.0, seed=i) for i in range(8)],
    }
    cpu = torch.device("cpu")
    from tokenmill.kernels import cpu_kernel
    from tokenmill.ops.cpu_ops import CpuOps

    ops = CpuOps(cpu_kernel.load())
    samplers = {"this tree": lambda params: Sampler(0, cpu)(logits, params, [5] * r),
                "this tree, C++": lambda params: Sampler(0, cpu, ops.argmax, sample_plain=ops.sample_plain,
                                                         sample_filtered=ops.sample_filtered)(logits, params, [5] * r)}
    if args.against:
        old = sampler_at(args.against)
        ids = [str(i) for i in range(r)]
        samplers[args.against] = lambda params: old(0, cpu)(logits, ids, params)  # its (logits, ids, params) call
    print(f"rows {r}, vocab {args.vocab}, logits scale {args.scale}, threads {torch.get_num_threads()}")
    for name, params in mixes.items():
        best = {k: float("inf") for k in samplers}
        for _ in range(2):  # alternate
            for label, call in samplers.items():
                call(params)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call(params)
                best[label] = min(best[label], (time.perf_counter() - t0) / args.calls)
        print(f"{name:20s} " + "  ".join(f"{k}: {v * 1e3:7.2f} ms" for k, v in best.items()))


if __name__ == "__main__":
    main()
