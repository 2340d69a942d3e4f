"""Quantized linear layers (w8a8, int8 and int4 weight-only): each against the float product within a bound derived
from its quantization step; the C++ helpers against the torch ops; SmoothQuant's folding leaves the float model
unchanged; whole models (tiny random ones and SmolLM2) through every mode, and the quality gates of the README on
SmolLM2. GGUF's quantized blocks: test_quant_gguf.py."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.kernels import cpu_kernel
from tokenmill.model.quant import (INT4_GROUP_SIZE, INT8_GROUP_SIZE, Int8Groups, quantize_int4_groups,
                                   quantize_int8_groups, quantize_int8_rows)
from tokenmill.model.w8a8 import W8A8Weight, quantize_per_token, scaled_int8_epilogue
from tokenmill.model.weight_only import Int4Weight, Int8Weight, pack_int8_groups

needs_kernels = pytest.mark.skipif(cpu_kernel.load() is None, reason="the C++ CPU kernels do not build here")


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ------------------------------------------------------------------ the C++ helpers against the torch ops
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 576), (7, 100), (33, 1536)])  # tails that are not a multiple of 16
def test_quantize_rows_kernel_is_bit_equal_to_torch(dtype, shape):
    """Asymmetric per-row codes: the kernel's int8 codes, scales and minima equal quantize_per_token's torch ops bit for
    bit; the uint8 variant is the same codes + 128; a constant row and an outlier row included, and every value comes
    back within half a step."""
    x = _rand(*shape, seed=shape[1]).to(dtype)
    x[0, 3] = 40.0  # an outlier channel
    if shape[0] > 1:
        x[1] = 0.5  # a constant row: every code 0
    q, s, lo = cpu_kernel.load().quantize_rows_int8(x)
    u, s_u, lo_u = cpu_kernel.load().quantize_rows_uint8(x)
    assert all(torch.equal(a, b) for a, b in zip(quantize_per_token(x, cpu_kernel.load()), (q, s, lo)))
    ref_q, ref_s, ref_lo = quantize_per_token(x)  # no kernels: the torch ops
    assert torch.equal(s, ref_s) and torch.equal(lo, ref_lo) and torch.equal(q, ref_q)
    assert torch.equal(s_u, s) and torch.equal(lo_u, lo) and torch.equal((u.int() - 128).to(torch.int8), q)
    back = q.float() * s[:, None] + (lo + 128 * s)[:, None]
    assert ((back - x.float()).abs() <= s[:, None] * 0.5001 + 1e-6).all()
    assert int(u.min()) == 0 and int(u.max()) == 255  # the whole range is used


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_epilogue_kernel_equals_torch(dtype):
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-50000, 50000, (9, 40), dtype=torch.int32, generator=g)
    xs, ws = torch.rand(9, generator=g) / 100, torch.rand(40, generator=g) / 100
    xlo, wsum = -torch.rand(9, generator=g), torch.randint(-2000, 2000, (40,), generator=g).float()
    bias, res = _rand(40, seed=2).to(dtype), _rand(9, 40, seed=3).to(dtype)
    out = torch.empty(9, 40, dtype=dtype)
    cpu_kernel.load().int8_epilogue(acc, xs, xlo, ws, wsum, bias, res, out)
    z = xlo.double() + 128 * xs.double()
    exact = (acc.double() * xs.double()[:, None] + z[:, None] * wsum.double()) * ws.double()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), exact + bias.double() + res.double(), atol=1e-5, rtol=eps)  # rounded once
    none = torch.empty(9, 40, dtype=dtype)
    cpu_kernel.load().int8_epilogue(acc, xs, xlo, ws, wsum, None, None, none)
    torch.testing.assert_close(none.double(), exact, atol=1e-5, rtol=eps)
    assert torch.equal(scaled_int8_epilogue(acc, xs, xlo, ws, wsum, bias, res, dtype, cpu_kernel.load()), out)
    # without kernels, the torch ops: the same within their two roundings
    torch.testing.assert_close(scaled_int8_epilogue(acc, xs, xlo, ws, wsum, bias, res, dtype).double(), out.double(),
                               atol=1e-5, rtol=2 * eps)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (7, 100, 40), (13, 576, 960), (50, 1536, 576), (3, 64, 130)])
def test_int8_gemm_kernel_equals_int_mm_and_the_epilogue(dtype, m, k, n):
    """The fused VNNI GEMM (uint8 codes against the packed weight, 128 * the channel sums taken off) gives
    torch._int_mm's int32 sums of the int8 codes exactly, scaled, with the zero-point term, biased and added to the
    residual as int8_epilogue does: equal up to the one rounding (float32 / bfloat16) of that epilogue. Shapes cover
    row tiles of 1-6 and partial 64-channel panels."""
    mod = cpu_kernel.load()
    if not mod.int8_gemm_available():
        pytest.skip("no AVX512-VNNI here")
    g = torch.Generator().manual_seed(m * 1000 + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) / 100
    bias, res = torch.randn(n, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    q, xs, xlo = mod.quantize_rows_int8(x)
    u, _, _ = mod.quantize_rows_uint8(x)
    packed, comp = mod.int8_pack_weight(w)
    wsum = w.sum(1, dtype=torch.int32)
    assert torch.equal(comp[:n], 128 * wsum)
    acc = q.int() @ w.int().T  # exact in int32 here
    eps = torch.finfo(dtype).eps
    for b, r in [(None, None), (bias, res), (None, res)]:
        out = torch.empty(m, n, dtype=dtype)
        mod.int8_gemm(u, packed, comp, xs, xlo, ws, b, r, out)
        ref = scaled_int8_epilogue(acc, xs, xlo, ws, wsum.float(), b, r, dtype)
        torch.testing.assert_close(out.double(), ref.double(), rtol=eps, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("m,k,n", [(1, 8, 5), (6, 64, 16), (13, 576, 130), (70, 1536, 48)])
def test_int8_mm_equals_int_mm(kernels, m, k, n):
    """The AVX2 int8 GEMM (w8a8's int32 sums where VNNI is not built): torch._int_mm's sums exactly, the extreme
    codes included (activations at -128, weights at +-127: the products vpmaddubsw could saturate on), over row tiles
    of 1-4 and partial 16-channel panels; a weight code of -128 is refused (its sign cannot flip in int8)."""
    if not kernels.int8_mm_available():
        pytest.skip("int8_mm needs AVX2")
    g = torch.Generator().manual_seed(m * 100 + k + n)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    q[0, : k // 2], w[0, : k // 2], w[-1, : k // 2] = -128, -127, 127  # the largest pairs, both signs
    got = kernels.int8_mm(q, kernels.int8_mm_pack(w), n)
    assert got.dtype == torch.int32 and torch.equal(got, q.int() @ w.int().T)
    assert got[0, 0] == 128 * 127 * (k // 2) + int(q[0, k // 2:].int() @ w[0, k // 2:].int())
    w[0, 0] = -128
    with pytest.raises(RuntimeError, match="-127..127"):
        kernels.int8_mm_pack(w)


@needs_kernels
def test_int8_packings_lay_the_weight_out_in_k4_panels(kernels):
    """int8_pack_weight (VNNI's panels of 64 channels, with 128 x each channel's sum) and int8_mm_pack (AVX2's panels
    of 16) share one packing: [panels, K / 4, NR, 4], channels past N zero. Checked on every build, VNNI or not."""
    g = torch.Generator().manual_seed(1)
    for n, k in [(5, 8), (64, 64), (130, 576)]:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        packed, comp = kernels.int8_pack_weight(w)
        for nr, got in [(64, packed), (16, kernels.int8_mm_pack(w))]:
            panels = -(-n // nr)
            want = torch.zeros(panels * nr, k, dtype=torch.int8)
            want[:n] = w
            assert torch.equal(got, want.view(panels, nr, k // 4, 4).permute(0, 2, 1, 3)), (n, k, nr)
        sums = torch.zeros(comp.shape, dtype=torch.int32)
        sums[:n] = 128 * w.sum(1, dtype=torch.int32)
        assert torch.equal(comp, sums)


@needs_kernels
def test_w8a8_takes_int8_mm_where_vnni_is_not_built(kernels):
    """A w8a8 layer on a build without AVX512-VNNI (the x86-64-v3 build here, or an AVX2-only CPU's own) holds the
    int8_mm panels and gives what torch._int_mm's sums and the same epilogue give, bit for bit."""
    if kernels.int8_gemm_available() or not kernels.int8_mm_available():
        pytest.skip("this build takes int8_gemm (VNNI), or has no AVX2")
    w, x, res = _rand(48, 64, seed=9, scale=0.05), _rand(5, 64, seed=10).bfloat16(), _rand(5, 48, seed=11).bfloat16()
    lin = W8A8Weight(48, 64, kernels)
    lin.load_rows(0, w)
    qw, ws = lin.qweight.clone(), lin.scale.clone()
    lin.finalize(torch.bfloat16)
    assert lin.mm_packed is not None and lin.qweight is None and lin.packed is None
    xq, xs, xlo = quantize_per_token(x, kernels)
    acc = torch._int_mm(xq, qw.t().contiguous())
    want = scaled_int8_epilogue(acc, xs, xlo, ws, qw.sum(1, dtype=torch.int32).float(), None, res, torch.bfloat16,
                                kernels)
    assert torch.equal(lin(x, None, res), want)


@needs_kernels
def test_w8a8_gated_down_projection_fuses_the_activation():
    """Linear.forward_gated under w8a8 in bfloat16: silu(gate) * up and its quantization in one C++ pass give the
    codes quantize_rows_uint8 gives for the torch ops' product (exp's last bit aside), so the layer's output equals
    the unfused one's (checked element for element, with a tolerance of one code step for a flipped rounding)."""
    import torch.nn.functional as F

    from tokenmill.model.layers import Build, Linear
    from tokenmill.ops.cpu_ops import CpuOps

    torch.manual_seed(12)
    down = Linear(64, 48, False, Build(CpuOps(cpu_kernel.load()), torch.bfloat16, "w8a8"))
    w = _rand(48, 64, seed=13, scale=0.05)
    down.load_rows(0, w, "down")
    down.finalize()
    gate_up = (torch.randn(9, 128) * 3).bfloat16()
    residual = torch.randn(9, 48).bfloat16()
    fused = down.forward_gated(gate_up, residual)
    gate, up = gate_up.split(64, dim=-1)
    unfused = down(F.silu(gate) * up, residual)
    h = (F.silu(gate) * up).float()
    qw, ws = quantize_int8_rows(w)
    x_step = (h.amax(1) - h.amin(1)) / 255
    step = x_step[:, None] * (qw.float().abs().sum(1) * ws)[None, :]  # every input code off by one
    assert ((fused.float() - unfused.float()).abs() <= step + 2 * torch.finfo(torch.bfloat16).eps * (
        unfused.float().abs() + 1)).all()
    fused_q = cpu_kernel.load().silu_mul_quantize_uint8(gate_up)
    unfused_q = cpu_kernel.load().quantize_rows_uint8((F.silu(gate) * up).contiguous())
    assert torch.equal(fused_q[1], unfused_q[1]) and torch.equal(fused_q[2], unfused_q[2])


@needs_kernels
def test_w8a8_without_the_kernels_equals_with_them():
    """Without the C++ kernels (TorchOps, or no compiler), w8a8 runs the torch ops: the same int8 codes, the result
    within one rounding of the activations' dtype (the kernel rounds the fused epilogue once)."""
    w, x, res = _rand(48, 64, seed=9, scale=0.05), _rand(5, 64, seed=10).bfloat16(), _rand(5, 48, seed=11).bfloat16()

    def layer(kernels):
        lin = W8A8Weight(48, 64, kernels)
        lin.load_rows(0, w)
        lin.finalize(torch.bfloat16)
        return lin

    if not cpu_kernel.load().int8_gemm_available():
        pytest.skip("the fused int8 GEMM needs AVX512-VNNI")
    with_kernels = layer(cpu_kernel.load())
    assert with_kernels.packed is not None  # the fused int8 GEMM
    y_k, q_k = with_kernels(x, None, res), quantize_per_token(x, cpu_kernel.load())
    without = layer(None)
    assert without.packed is None and without.qweight.shape == (64, 48)  # torch._int_mm's [K, N]
    y_t, q_t = without(x, None, res), quantize_per_token(x)
    assert all(torch.equal(a, b) for a, b in zip(q_k, q_t))
    torch.testing.assert_close(y_t.float(), y_k.float(), rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-2)


# ------------------------------------------------------------------ layers against the float product
def _bound(x: torch.Tensor, dw: torch.Tensor, w: torch.Tensor | None = None, dx: torch.Tensor | None = None):
    """|y - x W^T| <= |x| |dW|^T (+ |dx| |W|^T + |dx| |dW|^T): the worst case of the rounding errors dW and dx."""
    b = x.abs() @ dw.abs().T
    if dx is not None:
        b += dx.abs() @ (w.abs() + dw.abs()).T
    return b


@needs_kernels
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 32, 16), (7, 96, 50), (53, 576, 96), (130, 64, 33)])
def test_int8g_gemm_kernel_equals_the_float_product(m, k, n, xdtype, kernels):
    """The grouped int8 weight-only GEMM (codes widened to bfloat16, a group's sum scaled once, its offset times the
    input's group sum added) equals the float64 product of the bfloat16 input with the dequantized groups, up to
    float32 summation (K products, exact in float32, K / 32 group sums of the input and 2K / 32 scaled partial sums)
    and the output's one rounding; with float32 x (the portable path: the panel dequantized to float32, one rounding
    per weight, then K float32 products) within the same bound. Shapes cover row counts across register tiles (6, or
    3 without AVX-512) and tasks (48) and channels past a panel of 32; bias and residual fused."""
    mod = kernels
    if xdtype == torch.bfloat16 and not mod.int8g_bf16_available():
        pytest.skip("int8g_gemm with bfloat16 input needs AVX512-BF16")
    g = torch.Generator().manual_seed(m * 1000 + n)
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scale = (torch.rand(n, k // 32, generator=g) * 1e-2 + 1e-4).half()
    offset = (torch.rand(n, k // 32, generator=g) - 0.5).half()
    x = _rand(m, k, seed=n).to(xdtype)
    packed, scales = pack_int8_groups(Int8Groups(q, scale.float(), offset.float()))
    ref_w = (q.double() * scale.double().repeat_interleave(32, 1) + offset.double().repeat_interleave(32, 1))
    mag = x.double().abs() @ (q.double().abs() * scale.double().repeat_interleave(32, 1)  # sum of |terms|
                              + offset.double().abs().repeat_interleave(32, 1)).T
    for dtype in (torch.float32, torch.bfloat16):
        b, r = _rand(n, seed=1).to(dtype), _rand(m, n, seed=2).to(dtype)
        for bias, res in ((None, None), (b, r)):
            out = torch.empty(m, n, dtype=dtype)
            mod.int8g_gemm(x, packed, scales, bias, res, out)
            ref = x.double() @ ref_w.T
            if bias is not None:
                ref = ref + bias.double() + res.double()
            tol = 4 * k * torch.finfo(torch.float32).eps * (mag + ref.abs() + 1)
            if dtype == torch.bfloat16:
                tol = tol + torch.finfo(torch.bfloat16).eps / 2 * ref.abs() * 1.01
            assert ((out.double() - ref).abs() <= tol).all(), dtype


def test_int8_groups_within_half_a_step_with_float16_scales_and_offsets():
    w = _rand(24, 96, seed=11, scale=0.05)
    w[3, 40] = 4.0  # an outlier costs only its own group
    w[5, :32] = 0.0  # an all-zero group stays zero
    w[6, 32:64] = w[6, 32:64].abs()  # a lopsided group (all >= 0): 256 codes over its range, not 2 x its max
    w[7, :32] = 0.3  # a constant group
    groups = quantize_int8_groups(w)
    for t in (groups.scale, groups.offset):
        assert torch.equal(t, t.half().float())  # float16 values
    step = groups.scale.repeat_interleave(INT8_GROUP_SIZE, 1)
    assert ((groups.dequantize() - w).abs() <= step / 2 * 1.0001).all()  # no weight pushed past the codes
    assert (groups.dequantize()[5, :32] == 0).all() and (groups.dequantize()[7, :32] - 0.3).abs().max() < 1e-6
    assert (groups.dequantize()[3, 64:] - w[3, 64:]).abs().max() < 0.05 / 127  # other groups keep a fine step
    lopsided = w[6, 32:64]
    assert groups.scale[6, 1] <= (lopsided.max() - lopsided.min()) / 255 * 1.002  # symmetric: max / 127, 2x coarser
    with pytest.raises(ValueError, match="multiple of 32"):
        Int8Weight(8, 48)


@pytest.mark.parametrize("path", ["bfloat16", "portable", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weight_only_within_half_a_step(dtype, path, monkeypatch):
    """With the C++ kernels: groups of 32 (half a group's step), written into the kernel's panels as the rows load
    (two shards, the first ending inside a panel), the input multiplied in bfloat16 (AVX512-BF16) or in float32 (the
    portable path, as on a CPU without it); without the kernels, per channel (half a channel's step). Loading int8
    groups (a Q8_0 file's) keeps them as they are on the kernel paths."""
    kernels = cpu_kernel.load() if path != "none" else None
    if path == "none":
        pass
    elif kernels is None:
        pytest.skip("needs the C++ kernels")
    elif path == "portable":
        monkeypatch.setattr(cpu_kernel.load(), "int8g_bf16_available", lambda: False)
    elif not cpu_kernel.load().int8g_bf16_available():
        pytest.skip("int8g_gemm with bfloat16 input needs AVX512-BF16")
    w, x, bias = _rand(96, 64, seed=1, scale=0.05), _rand(5, 64, seed=2), _rand(96, seed=3)
    layer = Int8Weight(96, 64, kernels)
    layer.load_rows(0, w[:40])  # two shards, as a fused layer is loaded
    layer.load_rows(40, w[40:])
    layer.finalize(dtype)
    assert (layer.packed is not None) == (kernels is not None)
    y = layer(x.to(dtype), bias.to(dtype)).float()
    groups = quantize_int8_groups(w)
    if kernels is not None:
        step = (groups.scale / 2).repeat_interleave(INT8_GROUP_SIZE, 1)  # |dW| <= half a step per group
    else:
        step = (quantize_int8_rows(w)[1] / 2)[:, None].expand_as(w)  # half a step per row
    err = (y - (x @ w.T + bias)).abs()
    bf16 = torch.finfo(torch.bfloat16).eps  # weight-only kernels multiply in bfloat16, whatever the model's dtype
    assert (err <= _bound(x, step) + 3 * bf16 * (x.abs() @ w.abs().T + bias.abs())).all()
    if kernels is not None:
        back = layer.groups()  # the packed panels give back exactly the loaded groups
        assert all(torch.equal(a, b) for a, b in zip((back.q, back.scale, back.offset),
                                                     (groups.q, groups.scale, groups.offset)))
        exact = Int8Weight(96, 64, kernels)
        exact.load_rows(0, groups)
        exact.finalize(torch.float32)
        deq = groups.dequantize()
        xb = x.bfloat16().float() if path == "bfloat16" else x  # the input's rounding (and float32 summation)
        assert ((exact(x, None) - xb @ deq.T).abs() <= 1e-5 * (xb.abs() @ deq.abs().T) + 1e-7).all()
        torch.testing.assert_close(layer.column_absmax(), deq.abs().amax(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_within_half_a_step_and_from_groups_exact(dtype):
    w, x = _rand(64, 128, seed=4, scale=0.05), _rand(3, 128, seed=5)
    groups = quantize_int4_groups(w)
    step = (groups.scale / 2).repeat_interleave(INT4_GROUP_SIZE, 1)
    assert ((groups.dequantize() - w).abs() <= step + 1e-7).all()
    layer = Int4Weight(64, 128)
    layer.load_rows(0, w)
    layer.finalize(dtype)
    y = layer(x.to(dtype), None).float()
    bf16 = torch.finfo(torch.bfloat16).eps  # weight-only kernels multiply in bfloat16, whatever the model's dtype
    assert ((y - x @ w.T).abs() <= _bound(x, step) + 3 * bf16 * (x.abs() @ w.abs().T + 1)).all()
    # weights already in 4-bit groups (a GGUF file's) load exactly: the product equals the dequantized weights' up to
    # the bfloat16 rounding of the input and of each group's scale and zero (no 4-bit rounding on top)
    exact = Int4Weight(64, 128)
    exact.load_rows(0, groups)
    exact.finalize(torch.float32)
    deq = groups.dequantize()
    assert ((exact(x, None) - x @ deq.T).abs() <= 4 * bf16 * (x.abs() @ deq.abs().T + x.abs() @ (
        groups.zero.abs().repeat_interleave(INT4_GROUP_SIZE, 1)).T + 1e-3)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w8a8_within_the_rounding_of_weights_and_activations(dtype):
    w, x, res = _rand(80, 64, seed=6, scale=0.05), _rand(6, 64, seed=7), _rand(6, 80, seed=8)
    x[2, 5] = 30.0  # a token with an outlier channel
    layer = W8A8Weight(80, 64, cpu_kernel.load())
    layer.load_rows(0, w)
    layer.finalize(dtype)
    xd = x.to(dtype)
    y = layer(xd, None, res.to(dtype)).float()
    _, wscale = quantize_int8_rows(w)
    _, xscale, _ = quantize_per_token(xd)
    dw = (wscale / 2)[:, None].expand_as(w)
    dx = (xscale / 2)[:, None].expand_as(x)
    ref = xd.float() @ w.T + res.to(dtype).float()
    slack = 1e-4 if dtype == torch.float32 else 3 * torch.finfo(dtype).eps * (ref.abs() + 1)
    assert ((y - ref).abs() <= _bound(xd.float(), dw, w, dx) + slack).all()


def test_int4_needs_groups_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        Int4Weight(8, 48)


# ------------------------------------------------------------------ whole models
@pytest.mark.parametrize("arch", ["llama", "llama3_tied", "qwen2", "qwen3", "gemma2", "mixtral", "qwen2_moe"])
def test_tiny_models_in_every_mode_stay_close_to_float(tmp_path, arch):
    """w8a8 also runs the LM head as an int8 GEMM (a tied one from its own copy of the embeddings). A MoE model's
    experts (and shared expert) are quantized like the dense layers; its routers stay float."""
    save_tiny_model(arch, tmp_path / arch)
    ids = [(5 * i + 1) % 200 + 3 for i in range(40)]
    ref = torch.tensor(LLM(str(tmp_path / arch), kv_cache_memory=0.05, cache_dir=str(tmp_path)).engine.score(ids))
    for q, tol in (("int8", 0.02), ("int4", 0.3), ("w8a8", 0.1)):
        llm = LLM(str(tmp_path / arch), quantization=q, kv_cache_memory=0.05, cache_dir=str(tmp_path))
        ours = torch.tensor(llm.engine.score(ids))
        assert (ours - ref).abs().mean() < tol, (q, (ours - ref).abs().mean())
        head = llm.engine.runner.model.lm_head
        assert (head is not None and head.quantized is not None) == (q == "w8a8")
        for layer in llm.engine.runner.model.layers:
            if hasattr(layer.mlp, "experts"):
                assert all(e.gate_up_proj.quantized is not None and e.down_proj.quantized is not None
                           for e in layer.mlp.experts) and layer.mlp.gate.quantized is None
        out = llm.generate([ids[:10]], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
        assert len(out.token_ids) == 5


def test_smoothquant_folding_leaves_the_float_model_unchanged(tmp_path):
    """The factors folded into norms, weights and up's rows cancel exactly in float arithmetic (up to rounding)."""
    from tokenmill.model import smoothquant
    from tokenmill.model.loader import iter_safetensors, load_model

    save_tiny_model("llama", tmp_path / "m")
    plain = load_model(str(tmp_path / "m"), "float32")
    ids = [(3 * i + 2) % 200 + 3 for i in range(30)]
    stats = smoothquant.input_absmax(plain.model, ids)
    factors = smoothquant.smoothing_factors(plain.model, stats)
    assert all((f > 0).all() for layer in factors.values() for f in layer.values())
    assert any((f - 1).abs().max() > 0.1 for layer in factors.values() for f in layer.values())  # not a no-op
    smoothed = load_model(str(tmp_path / "m"), "float32")
    smoothed.model.load_weights(smoothquant.smooth(iter_safetensors(tmp_path / "m"), factors))
    a = smoothquant.input_absmax(plain.model, ids)
    b = smoothquant.input_absmax(smoothed.model, ids)
    down = "layers.0.mlp.down_proj"
    torch.testing.assert_close(b[down] * factors[0]["down"], a[down], rtol=1e-4, atol=1e-5)  # inputs divided by s
    torch.testing.assert_close(smoothquant.prefill(smoothed.model, ids), smoothquant.prefill(plain.model, ids),
                               rtol=1e-4, atol=1e-4)


def test_dummy_weights_at_a_config_only_directory(tmp_path):
    """load_format="dummy": random weights of a config's shapes (no checkpoint, no tokenizer needed); the packed
    modes hold fewer bytes."""
    from helpers import tiny_config

    d = tmp_path / "shape"
    d.mkdir()
    cfg = {**tiny_config("llama").to_dict(), "architectures": ["LlamaForCausalLM"]}
    (d / "config.json").write_text(json.dumps(cfg))
    sizes = {}
    for q in ("none", "int8", "int4", "w8a8"):
        llm = LLM(str(d), load_format="dummy", quantization=q, dtype="bfloat16", kv_cache_memory=0.05,
                  cache_dir=str(tmp_path))
        out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                           use_tqdm=False)[0]
        assert len(out.token_ids) == 4
        sizes[q] = llm.engine.weight_bytes
    assert sizes["int4"] < sizes["int8"] < sizes["none"] and sizes["w8a8"] < sizes["none"]


# ------------------------------------------------------------------ SmolLM2: the quality gates
def test_smollm2_quality_gates(cache_dir):
    """README's table: perplexity on the shipped eval text against float32 (w8a8 within 3%, int8 within 0.5%, int4
    within 5%), in bfloat16 as the modes are meant to run."""
    from tokenmill.eval import DEFAULT_TEXT, perplexity

    def ppl(**options):
        llm = LLM(kv_cache_memory=0.25, max_model_len=1024, cache_dir=cache_dir, **options)
        ids = llm.tokenizer(DEFAULT_TEXT.read_text(), add_special_tokens=False).input_ids
        return perplexity(llm.engine, ids, 512).perplexity, llm.engine.weight_bytes

    ref, ref_bytes = ppl(dtype="float32")
    for q, limit in (("w8a8", 0.03), ("int8", 0.005), ("int4", 0.05)):
        p, nbytes = ppl(dtype="bfloat16", quantization=q)
        assert abs(p / ref - 1) <= limit, (q, p, ref)
        assert nbytes < ref_bytes / 2


def test_quantized_job_and_eval_commands(run_cli, tmp_path):
    from helpers import read_jsonl, write_jsonl

    rows = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"Count to {i}:"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    run_cli("run", rows, "-o", out, "--quantization", "int4", "--dtype", "bfloat16", "--max-tokens", 6, "-q",
            check=0)
    assert sorted(r["id"] for r in read_jsonl(out)) == ["r0", "r1", "r2", "r3"]
    p = run_cli("run", rows, "-o", out, "--quantization", "int8", "--max-tokens", 6, "-q")
    assert p.returncode == 2 and "quantization" in p.stderr  # a resume with another setting is refused
    p = run_cli("eval", "--quantization", "int4", "--limit-tokens", 200, "--max-tokens", 4, "--json", check=0)
    r = json.loads(p.stdout)
    assert r["quantization"] == "int4" and r["setting"] == "float32 int4" and "agreement" in r
    p = run_cli("eval", "--quantization", "int3")
    assert p.returncode == 2 and "Traceback" not in p.stderr
