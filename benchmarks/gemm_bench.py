"""The CPU GEMM paths side by side on a model's linear shapes: aten ``F.linear``, oneDNN with the plain weight
(reordered inside every call), oneDNN with the weight prepacked once (``model/gemm.py``'s ``pack``) and, on an
AVX2-only CPU, tokenmill's panel GEMM (``cpu_gemm="panels"``, nan elsewhere), float32 and bfloat16, at the row counts
a batch engine runs (1 row: a lone decode; 32-256: decode batches; 2048: a prefill chunk). On a CPU without oneDNN's
bf16 kernels (AVX2 only) bfloat16's oneDNN columns are nan but the packed one, which is then the "onednn" path's
widened GEMM (float32 GEMMs on widened operands).

    python -m benchmarks.gemm_bench [--rows 1,8,32,128,512,2048] [--json OUT]
    python -m benchmarks.gemm_bench --int8 [--rows ...]   # w8a8: _int_mm / int8_mm + epilogue, int8_gemm(_amx)
    python -m benchmarks.gemm_bench --int8-weight-only [--rows ...]   # int8: int8g_gemm against torch's and bf16

Prints GFLOP/s per (dtype, shape, rows, path) and checks that the packed result equals the plain one bit for bit.
With --int8: GOP/s of w8a8's CPU paths (the activations' quantization included in each; int8_gemm_amx is int8_gemm
where the host has no AMX-INT8), bfloat16 output, and the bfloat16 model's prepacked GEMM for scale.
With --int8-weight-only: GFLOP/s of int8's grouped C++ GEMM (``int8g_gemm``, bfloat16 input and float32 input),
torch's per-channel int8 kernel and the bfloat16 model's prepacked oneDNN GEMM, bfloat16 output.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from tokenmill.model import gemm

# SmolLM2-135M's linears: (name, out, in)
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("lm_head", 49152, 576)]


def rate(fn, flops: float, min_s: float = 0.3) -> float:
    for _ in range(3):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return flops * n / (time.perf_counter() - t0) / 1e9


def int8_paths(rows_list: list[int]) -> list[dict]:
    """w8a8's layer on each shape: quantize + torch._int_mm + int8_epilogue | quantize + int8_mm (AVX2) +
    int8_epilogue | quantize + the fused int8_gemm (AVX512-VNNI) | int8_gemm_amx; a path this build lacks is nan."""
    from tokenmill.kernels import cpu_kernel
    from tokenmill.model.w8a8 import quantize_per_token, scaled_int8_epilogue

    kernels = cpu_kernel.load()
    vnni, avx2 = kernels.int8_gemm_available(), kernels.int8_mm_available()
    results = []
    print(f"threads {torch.get_num_threads()}; GOP/s: _int_mm + epilogue | int8_mm + epilogue | int8_gemm | "
          "int8_gemm_amx | bf16 packed (best int8 path / _int_mm, int8_gemm_amx / bf16 packed)")
    for name, n, k in SHAPES:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        w_kn, ws, w_sum = w.t().contiguous(), torch.rand(n) / 100, w.sum(1, dtype=torch.int32).float()
        packed, comp = kernels.int8_pack_weight(w)
        mm_packed = kernels.int8_mm_pack(w) if avx2 else None
        bf16_w = gemm.pack(torch.randn(n, k).bfloat16(), "onednn")
        for m in rows_list:
            x = torch.randn(m, k).bfloat16()
            out = torch.empty(m, n, dtype=torch.bfloat16)

            def int_mm(mm=lambda q: torch._int_mm(q, w_kn)):
                q, xs, xlo = quantize_per_token(x, kernels)
                return scaled_int8_epilogue(mm(q), xs, xlo, ws, w_sum, None, None, torch.bfloat16, kernels)

            def fused(gemm_fn=kernels.int8_gemm):
                u, xs, xlo = kernels.quantize_rows_uint8(x)
                gemm_fn(u, packed, comp, xs, xlo, ws, None, None, out)

            ops, nan = 2.0 * m * n * k, float("nan")
            r = {"shape": name, "out": n, "in": k, "rows": m, "int_mm": rate(int_mm, ops),
                 "int8_mm": rate(lambda: int_mm(lambda q: kernels.int8_mm(q, mm_packed, n)), ops) if avx2 else nan,
                 "int8_gemm": rate(fused, ops) if vnni else nan,
                 "int8_gemm_amx": rate(lambda: fused(kernels.int8_gemm_amx), ops) if vnni else nan,
                 "bf16_packed": rate(lambda: gemm.linear(x, bf16_w), ops)}
            results.append(r)
            best = r["int8_gemm"] if vnni else r["int8_mm"]
            print(f"{name:>7} {n:>5}x{k:<4} rows {m:>4}: {r['int_mm']:6.0f} | {r['int8_mm']:6.0f} | "
                  f"{r['int8_gemm']:6.0f} | {r['int8_gemm_amx']:6.0f} | {r['bf16_packed']:6.0f} "
                  f"({best / r['int_mm']:.2f}x, {r['int8_gemm_amx'] / r['bf16_packed']:.2f}x)", flush=True)
    return results


def int8_weight_only_paths(rows_list: list[int]) -> list[dict]:
    """int8 weight-only on each shape: int8g_gemm with bfloat16 input (AVX512-BF16) | int8g_gemm with float32 input
    (the portable path, any CPU) | torch._weight_int8pack_mm (per channel) | packed bfloat16 (the float model's GEMM,
    for scale)."""
    from tokenmill.kernels import cpu_kernel
    from tokenmill.model.quant import Int8Groups
    from tokenmill.model.weight_only import pack_int8_groups

    kernels = cpu_kernel.load()
    bf16_ok = kernels.int8g_bf16_available()
    results = []
    print(f"threads {torch.get_num_threads()}; GFLOP/s: int8g_gemm bf16 | int8g_gemm f32 | _weight_int8pack_mm | "
          "bf16 packed (int8g bf16 / bf16, int8g f32 / bf16)")
    for name, n, k in SHAPES:
        q = torch.randint(-128, 128, (n, k), dtype=torch.int8)
        packed, scales = pack_int8_groups(Int8Groups(q, (torch.rand(n, k // 32) / 100).half().float(),
                                                     (torch.rand(n, k // 32) / 100).half().float()))
        channel_scale, bf16_w = (torch.rand(n) / 100).bfloat16(), gemm.pack(torch.randn(n, k).bfloat16(), "onednn")
        for m in rows_list:
            x = torch.randn(m, k).bfloat16()
            x32 = x.float()
            out = torch.empty(m, n, dtype=torch.bfloat16)
            flops = 2.0 * m * n * k
            r = {"shape": name, "out": n, "in": k, "rows": m,
                 "int8g_gemm": (rate(lambda: kernels.int8g_gemm(x, packed, scales, None, None, out), flops)
                                if bf16_ok else float("nan")),
                 "int8g_gemm_f32": rate(lambda: kernels.int8g_gemm(x32, packed, scales, None, None, out), flops),
                 "int8pack_mm": rate(lambda: torch._weight_int8pack_mm(x, q.clamp(-127, 127), channel_scale), flops),
                 "bf16_packed": rate(lambda: gemm.linear(x, bf16_w), flops)}
            results.append(r)
            print(f"{name:>7} {n:>5}x{k:<4} rows {m:>4}: {r['int8g_gemm']:6.0f} | {r['int8g_gemm_f32']:6.0f} | "
                  f"{r['int8pack_mm']:6.0f} | {r['bf16_packed']:6.0f} ({r['int8g_gemm'] / r['bf16_packed']:.2f}x, "
                  f"{r['int8g_gemm_f32'] / r['bf16_packed']:.2f}x)", flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,8,32,128,512,2048")
    ap.add_argument("--int8", action="store_true", help="w8a8's int8 paths instead of the float ones")
    ap.add_argument("--int8-weight-only", action="store_true", help="int8 weight-only paths against packed bf16")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    if args.int8 or args.int8_weight_only:
        key = "int8" if args.int8 else "int8_weight_only"
        results = int8_paths(rows_list) if args.int8 else int8_weight_only_paths(rows_list)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, key: results}, f, indent=1)
        return
    results = []
    print(f"threads {torch.get_num_threads()}; GFLOP/s: aten | oneDNN plain | oneDNN packed (packed / plain) | "
          "panels (panels / packed)")
    for dtype in (torch.float32, torch.bfloat16):
        for name, n, k in SHAPES:
            w = torch.randn(n, k).to(dtype)
            packed = gemm.pack(w, "onednn")
            panels = gemm.pack(w, "panels") if gemm.panels_available() else None
            onednn = dtype in gemm._ONEDNN_DTYPES  # bf16 without AVX-512: no oneDNN bf16 linear at all
            for m in rows_list:
                x = torch.randn(m, k).to(dtype)
                flops = 2.0 * m * n * k

                def plain():
                    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

                # the packed column is the model's path: on a CPU without oneDNN's bf16 kernels the bf16 weight
                # stays plain and gemm.linear runs oneDNN's float32 GEMM on widened operands
                r = {"dtype": str(dtype).removeprefix("torch."), "shape": name, "out": n, "in": k, "rows": m,
                     "aten": rate(lambda: F.linear(x, w), flops),
                     "onednn_plain": rate(plain, flops) if onednn else float("nan"),
                     "onednn_packed": rate(lambda: gemm.linear(x, packed), flops),
                     "bit_equal": torch.equal(gemm.linear(x, packed), plain()) if onednn else True,
                     "panels": rate(lambda: gemm.linear(x, panels), flops) if panels is not None else float("nan")}
                results.append(r)
                print(f"{r['dtype']:>8} {name:>7} {n:>5}x{k:<4} rows {m:>4}: {r['aten']:6.0f} | "
                      f"{r['onednn_plain']:6.0f} | {r['onednn_packed']:6.0f} "
                      f"({r['onednn_packed'] / r['onednn_plain']:.2f}x) | {r['panels']:6.0f} "
                      f"({r['panels'] / r['onednn_packed']:.2f}x){'' if r['bit_equal'] else '  (last bits differ)'}",
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
