"""Facts about the host a benchmark ran on, measured in the same run: the CPU model, the ISA levels that decide the
kernels (AVX2 / AVX-512 / AMX), and the GEMM rates that are the rooflines of its tables."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def host_info() -> dict:
    """CPU model, the ISA levels that decide the kernels, threads."""
    import platform

    import torch

    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [name for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                                   ("AVX512-VNNI", "avx512_vnni"), ("AMX-BF16", "amx_bf16"),
                                   ("AMX-INT8", "amx_int8")) if flag in flags]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    return {"cpu": model, "isa": isa, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def _rate(fn, flops: float, seconds: float) -> float:
    for _ in range(3):
        fn()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        reps += 1
    return flops * reps / (time.perf_counter() - t0) / 1e9


def gemm_rates(seconds: float) -> dict:
    """GFLOP/s (GOP/s for int8) of a 1024^3 GEMM as the model layers run it: float32 and bfloat16 on the default
    ``cpu_gemm`` path, the weight packed (model/gemm.py: oneDNN, with AMX for bfloat16 where the CPU has it; on an
    AVX2-only CPU tokenmill's panel GEMM), int8 through torch._int_mm (the
    host's int8 rate as oneDNN reaches it), or through the C++ kernels' int8_mm where w8a8 takes it (a CPU without
    AVX512-VNNI: torch._int_mm runs at ~2 GOP/s there). Measured in the run: the rooflines of its tables."""
    import torch

    from tokenmill.model import gemm

    rates = {}
    backend = gemm.check_backend("auto")
    for dtype in (torch.float32, torch.bfloat16):
        a, w = torch.randn(1024, 1024, dtype=dtype), gemm.pack(torch.randn(1024, 1024, dtype=dtype), backend)
        rates[str(dtype).removeprefix("torch.")] = _rate(lambda: gemm.linear(a, w, None, backend), 2 * 1024**3,
                                                         seconds)
    a = torch.randint(-128, 127, (1024, 1024), dtype=torch.int8)
    b = torch.randint(-128, 127, (1024, 1024), dtype=torch.int8)
    from tokenmill.kernels import cpu_kernel

    kernels = cpu_kernel.load()
    if kernels is not None and not kernels.int8_gemm_available() and kernels.int8_mm_available():
        packed = kernels.int8_mm_pack(b.clamp(min=-127))
        rates["int8"] = _rate(lambda: kernels.int8_mm(a, packed, 1024), 2 * 1024**3, seconds)
        return rates
    try:
        rates["int8"] = _rate(lambda: torch._int_mm(a, b), 2 * 1024**3, seconds)
    except RuntimeError:  # a torch build without it
        pass
    return rates
