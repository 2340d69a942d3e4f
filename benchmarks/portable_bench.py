"""tokenmill's C++ kernels built for another CPU level, side by side with this machine's build:
``python -m benchmarks.portable_bench [--march x86-64-v3] [--settings float32:none,bfloat16:none] [--out DIR]``.

The kernels are compiled with ``-march=native``; on a CPU without AVX-512 they take portable code paths (vec16 as a
struct of AVX or SSE vectors, int8's float32 GEMM) that an AVX-512 machine never runs. This builds them for
``--march`` (default x86-64-v3: AVX2 and FMA, the level of most x86 CPUs without AVX-512) and measures, in one run:

- decode attention (``paged_attention``, 128 sequences of 52-276 tokens, SmolLM2's heads) with each build;
- workload W per setting (``DTYPE:QUANT``) with each build, alternating, every run in a fresh process.

Only tokenmill's own kernels change: torch and oneDNN pick their code at run time for the CPU they find, so on this
machine their GEMMs still use AVX-512. The figures show what the portable paths cost or gain, not a whole AVX2 host.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.quant_bench import run_one


def _build(march: str):
    from tokenmill.kernels import cpu_kernel

    return cpu_kernel.build_for_arch(march, _build_dir(march))


def _build_dir(march: str) -> Path:
    from tokenmill.kernels import cpu_kernel

    d = cpu_kernel.kernel_cache_root() / f"bench-{march}"  # ninja rebuilds only when the source changed
    d.mkdir(parents=True, exist_ok=True)
    return d


def attention_ms(kernels, dtype, repeats: int = 50) -> float:
    """Median ms of one decode attention call over SmolLM2-shaped heads (9 query heads, 3 KV heads, dim 64)."""
    import torch

    rng = random.Random(0)
    torch.manual_seed(0)
    R, H, Hkv, D, bs = 128, 9, 3, 64, 16
    lens = [rng.randint(32, 256) + 20 for _ in range(R)]
    nb = sum(-(-n // bs) for n in lens)
    k_cache, v_cache = (torch.randn(nb, bs, Hkv, D).to(dtype) for _ in range(2))
    tables = torch.zeros(R, max(-(-n // bs) for n in lens), dtype=torch.int64)
    used = 0
    for r, n in enumerate(lens):
        for j in range(-(-n // bs)):
            tables[r, j] = used
            used += 1
    q, seq_lens, qsl = torch.randn(R, H, D).to(dtype), torch.tensor(lens), torch.arange(R + 1)
    times = []
    for i in range(repeats + 3):
        t0 = time.perf_counter()
        kernels.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, D**-0.5)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def run_w(spec: dict) -> dict:
    """In a child process: W with the build of ``spec["march"]`` (None: this machine's) in place of the cached one."""
    ops = None
    if spec["march"]:
        from tokenmill.ops.cpu_ops import CpuOps

        ops = CpuOps(_build(spec["march"]))
    return run_one(spec, ops)


def child(spec: dict) -> dict:
    p = subprocess.run([sys.executable, "-m", "benchmarks.portable_bench", "--one", json.dumps(spec)],
                       capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--march", default="x86-64-v3")
    ap.add_argument("--settings", default="float32:none,bfloat16:none,bfloat16:int8",
                    help="W settings DTYPE:QUANT, each run with both builds")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_w(json.loads(args.one))))
        return
    import torch

    from tokenmill.kernels import cpu_kernel

    native, portable = cpu_kernel.load(), _build(args.march)
    builds = {"native": None, args.march: args.march}
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "march": args.march, "attention": [], "w": []}
    for dtype in (torch.float32, torch.bfloat16):
        for _ in range(2):  # alternating
            for name, mod in (("native", native), (args.march, portable)):
                ms = attention_ms(mod, dtype)
                result["attention"].append({"dtype": str(dtype).split(".")[-1], "build": name, "ms": ms})
                print(f"attention {dtype} {name}: {ms:.3f} ms", flush=True)
    for setting in args.settings.split(","):
        dtype, quant = setting.split(":")
        for name, march in builds.items():
            r = child({"dtype": dtype, "quantization": quant, "march": march})
            r["build"] = name
            result["w"].append(r)
            print(f"W {dtype} {quant} {name}: {r.get('output_tok_s', float('nan')):.1f} output tok/s "
                  f"{r.get('error', '')}", flush=True)
    lines = [f"# portable kernels ({result['machine']}, {result['threads']} threads, --march {args.march})", "",
             "| attention dtype | build | ms (median of 50) |", "|---|---|---|"]
    lines += [f"| {a['dtype']} | {a['build']} | {a['ms']:.3f} |" for a in result["attention"]]
    lines += ["", "| W setting | build | output tok/s |", "|---|---|---|"]
    lines += [f"| {r['dtype']} {r['quantization']} | {r['build']} | {r.get('output_tok_s', float('nan')):.1f} |"
              for r in result["w"]]
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "portable.json").write_text(json.dumps(result, indent=1))
        (args.out / "portable.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
