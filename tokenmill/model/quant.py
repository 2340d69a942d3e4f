"""Quantized weights for the linear layers (CPU): ``w8a8``, and ``int8`` / ``int4`` weight-only.

- ``w8a8``: int8 weights, symmetric per output channel; activations quantized to 8 bits per token on the fly
  (asymmetric: 256 levels from the token's minimum to its maximum, which costs less perplexity than symmetric absmax
  codes; BENCHMARKS.md), multiplied with int32 accumulation, then ``(acc * x_scale[token] + z[token] *
  w_sum[channel]) * w_scale[channel]``, where ``z`` is the value of code 0 and ``w_sum`` each channel's sum of codes.
  On a CPU with AVX512-VNNI the weight is packed once for the C++ kernels' ``int8_gemm`` (VNNI tiles, the scales,
  zero points, bias and residual fused into its stores); elsewhere ``torch._int_mm`` (oneDNN) and a separate epilogue
  pass. The throughput mode.
- ``int8``: int8 weight-only, in groups of 32 along K with a float16 scale and offset each, ``w = q * scale +
  offset``: asymmetric codes spanning each group's minimum to its maximum (``quantize_int8_groups``). GGUF's Q8_0
  blocks are the case offset = 0, so a Q8_0 file loads without rounding (``Int8Groups``). The rows are written
  straight into the panels of the C++ kernels' ``int8g_gemm`` as they load. Activations stay float: on a CPU with
  AVX512-BF16 they are multiplied in bfloat16 with the codes, widened to bfloat16 in the kernel (exact), each group's
  float32 sum scaled once and the offset times the input's group sum added (on a CPU with AMX, ``int8g_gemm_amx``:
  each panel dequantized to bfloat16 weights, one rounding per weight as oneDNN's and OpenVINO's weight decompression
  do, then tile products over all of K; several times faster); elsewhere the kernel's portable path
  dequantizes a panel of 32 channels at a time to float32 and multiplies the float32 input. Without the C++ kernels
  (no compiler) the rows are quantized symmetrically per output channel for ``torch._weight_int8pack_mm`` (a Q8_0
  file's groups requantized: a rounding). A little over half of bf16's weight bytes.
- The weight-only kernels multiply in bfloat16 (int8's on a CPU with AVX512-BF16): in a float32 model the layer's
  input is rounded to bfloat16 (torch's float32 weight-only paths run ~40x slower here, measured).
- ``int4``: 4-bit weights in groups of 32 along K with a scale and a zero per group, ``w = (q - 8) * scale + zero``
  (``torch._weight_int4pack_mm_for_cpu``). GGUF's Q4_0, Q4_1 and Q4_K blocks are exactly this form, so those files
  load without any rounding (``Int4Groups``, from ``model/gguf_weights.py``). A quarter of bf16's weight bytes. On a
  CPU with AMX the same bytes go through an AMX GEMM instead (``Int4Weight``, ``int4g_gemm_amx``).

Loading is row by row, because the model fuses checkpoint tensors (q/k/v, gate/up) into one weight: ``load_rows``
quantizes each shard as it arrives (one float tensor at a time, never the whole model) and ``finalize`` packs the
weight once every row is in. Per-channel and per-group scales make rows independent, so quantizing a shard alone
equals quantizing the fused weight.

Which layers stay in float: the token embeddings (a gather, not a GEMM) always; the LM head except in w8a8
(``model/llama.py``; measured in BENCHMARKS.md "Quantization").
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

INT4_GROUP_SIZE = 32  # GGUF's block size: Q4_0 / Q4_1 / Q4_K sub-blocks map onto groups one to one
INT8_GROUP_SIZE = 32  # GGUF Q8_0's block size


@dataclass
class Int4Groups:
    """A weight already in 4-bit groups (a GGUF Q4 tensor, a GPTQ/AWQ layer): ``w[n, k] = (q[n, k] - 8) *
    scale[n, g] + zero[n, g]`` with ``g = k // INT4_GROUP_SIZE``. With ``perm`` (GPTQ's act-order) the columns are
    the input channels in that order: column j holds input channel ``perm[j]`` (the layer permutes its input so)."""

    q: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K // 32] float32
    zero: torch.Tensor  # [N, K // 32] float32
    perm: torch.Tensor | None = None  # [K] int64, a permutation of 0..K-1

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:  # [N, K] float32, columns in input-channel order
        g = INT4_GROUP_SIZE
        w = (self.q.float() - 8) * self.scale.repeat_interleave(g, 1) + self.zero.repeat_interleave(g, 1)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


@dataclass
class Int8Groups:
    """A weight in int8 groups along K: ``w[n, k] = q[n, k] * scale[n, g] + offset[n, g]`` with ``g = k // 32``, the
    scales and offsets values of float16. A GGUF Q8_0 tensor is the case ``offset = None`` (zero)."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // 32] float32
    offset: torch.Tensor | None = None  # [N, K // 32] float32; None: zero

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        w = self.q.float() * self.scale.repeat_interleave(INT8_GROUP_SIZE, 1)
        return w if self.offset is None else w + self.offset.repeat_interleave(INT8_GROUP_SIZE, 1)


def quantize_int8_groups(w: torch.Tensor) -> Int8Groups:
    """Asymmetric int8 in groups of 32 along K: the group's 256 codes span its minimum to its maximum. [N, K] float ->
    Int8Groups with float16 scales and offsets; every weight within half a step, ``scale / 2``, of its value.

    The offset (the value of code 0, about the group's midpoint) is rounded to float16 first, and the scale is then
    the smallest float16 whose codes -128..127 still reach both ends of the group from that offset, so rounding the
    two never pushes a weight past the codes. (Against symmetric absmax codes, Q8_0's form, the step is up to 2x
    finer where a group's values are lopsided: BENCHMARKS.md "int8 in asymmetric groups".)"""
    n, k = w.shape
    if k % INT8_GROUP_SIZE:
        raise ValueError(f"int8 needs the input dimension to be a multiple of {INT8_GROUP_SIZE}, got {k}")
    g = w.float().reshape(n, k // INT8_GROUP_SIZE, INT8_GROUP_SIZE)
    lo, hi = g.amin(dim=2), g.amax(dim=2)  # [N, G]
    offset = (lo + 128 * ((hi - lo) / 255)).to(torch.float16).float()
    need = torch.maximum((hi - offset) / 127, (offset - lo) / 128)  # the smallest step that reaches both ends
    scale = need.to(torch.float16)
    scale = torch.where(scale.float() < need, torch.nextafter(scale, torch.full_like(scale, float("inf"))),
                        scale).float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((g - offset[..., None]) * inv[..., None]).clamp_(-128, 127).to(torch.int8).reshape(n, k)
    return Int8Groups(q, scale, offset)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``w ~ q * scale[:, None]``, |q| <= 127. [N, K] -> ([N, K] int8, [N] float32)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(w: torch.Tensor, group: int = INT4_GROUP_SIZE) -> Int4Groups:
    """Asymmetric min/max 4-bit groups along K. [N, K] float -> Int4Groups. The error is at most half a step,
    ``(max - min) / 30`` per group."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input dimension to be a multiple of {group}, got {k}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return Int4Groups(q, scale, lo + 8 * scale)


def quantize_per_token(x: torch.Tensor, kernels=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-row 8-bit codes of activations: [M, K] -> (q [M, K] int8, scale [M], x_min [M] float32) with
    ``u = round((x - x_min) * (1 / scale))`` in 0..255, ``scale = (max - min) / 255``, ``q = u - 128``, so
    ``x ~ q * scale + (x_min + 128 * scale)``. One C++ pass with ``kernels`` (the C++ module; bit-equal to the torch ops
    here, tested), the torch ops without."""
    if kernels is not None:
        q, scale, lo = kernels.quantize_rows_int8(x.contiguous())
        return q, scale, lo
    lo, hi = x.amin(dim=1, keepdim=True).float(), x.amax(dim=1, keepdim=True).float()
    scale = (hi - lo).clamp_(min=1e-12) / 255
    u = torch.round((x - lo) * (1 / scale)).clamp_(max=255)
    return (u - 128).to(torch.int8), scale[:, 0], lo[:, 0]


def scaled_int8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, x_min: torch.Tensor, w_scale: torch.Tensor,
                         w_sum: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                         dtype: torch.dtype, kernels=None) -> torch.Tensor:
    """acc [M, N] int32 (quantize_per_token's codes times the int8 weight) -> ``(acc * x_scale[:, None] + z[:, None]
    * w_sum) * w_scale (+ bias) (+ residual)`` in ``dtype``, ``z = x_min + 128 * x_scale``: one C++ pass with
    ``kernels`` (rounded once), torch ops without."""
    if kernels is not None:
        out = torch.empty(acc.shape, dtype=dtype, device=acc.device)
        if bias is not None:
            bias = bias.to(dtype).contiguous()
        if residual is not None:
            residual = residual.to(dtype).contiguous()
        kernels.int8_epilogue(acc, x_scale, x_min, w_scale, w_sum, bias, residual, out)
        return out
    z = x_min + 128 * x_scale
    y = (acc.float() * x_scale[:, None] + z[:, None] * w_sum).mul_(w_scale)
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual
    return y.to(dtype)


class QuantizedWeight(nn.Module, abc.ABC):
    """One linear layer's weight in a quantized format: ``load_rows`` then ``finalize`` once, then ``forward``.
    ``kernels`` is the C++ module (``ops.kernels``) or None: the torch paths then. ``amx``: the ops object chose the
    AMX kernels (``ops.amx``), which the formats that have one use."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.kernels = kernels
        self.amx = amx and kernels is not None

    @abc.abstractmethod
    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        """Rows ``offset:offset + len(w)`` from a float tensor (or 4- / 8-bit groups) of shape [rows, in_features]."""

    @abc.abstractmethod
    def finalize(self, dtype: torch.dtype) -> None:
        """Called once every row is loaded; ``dtype`` is the activations' dtype."""

    @abc.abstractmethod
    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        """Random weights straight in the stored format (``load_format="dummy"``), finalized."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """[..., in] -> [..., out] (+ bias) (+ residual [..., out])."""


def _to_float(w: torch.Tensor | Int4Groups | Int8Groups) -> torch.Tensor:
    return w.dequantize() if isinstance(w, (Int4Groups, Int8Groups)) else w


class W8A8Weight(QuantizedWeight):
    """``qweight`` is [N, K] while loading. Once final, where the C++ kernels run ``int8_gemm`` (a CPU with
    AVX512-VNNI, K a multiple of 4, float32 or bfloat16 activations): ``packed`` / ``comp`` (``int8_pack_weight``)
    and no ``qweight``; elsewhere ``qweight`` is [K, N] contiguous (``torch._int_mm``'s faster layout) and ``w_sum``
    its channels' sums of codes (the epilogue's term for the activations' zero point)."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))  # [N, K]
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))  # [N]
        self.register_buffer("packed", None)  # [ceil(N / 64), K / 4, 64, 4] int8 once final, on the kernel path
        self.register_buffer("comp", None)  # [ceil(N / 64) * 64] int32: 128 * each channel's sum of codes
        self.register_buffer("w_sum", None)  # [N] float32: each channel's sum of codes (the torch._int_mm path)

    def finalize(self, dtype: torch.dtype) -> None:
        kernels = self.kernels
        if (kernels is not None and kernels.int8_gemm_available() and self.in_features % 4 == 0
                and dtype in (torch.float32, torch.bfloat16)):
            self.packed, self.comp = kernels.int8_pack_weight(self.qweight.contiguous())
            self.qweight = None
        else:
            self.w_sum = self.qweight.sum(dim=1, dtype=torch.int32).float()
            self.qweight = self.qweight.t().contiguous()  # [K, N]

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        q, s = quantize_int8_rows(_to_float(w))
        self.qweight[offset:offset + q.shape[0]] = q
        self.scale[offset:offset + q.shape[0]] = s

    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        self.qweight.copy_(torch.randint(-127, 128, self.qweight.shape, generator=generator, dtype=torch.int8))
        self.scale.fill_(1e-3 / 127)
        self.finalize(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``out_dtype``: the result's dtype (default x's; the LM head asks for float32 logits directly)."""
        lead, dtype = x.shape[:-1], out_dtype or x.dtype
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        res = None if residual is None else residual.reshape(-1, self.out_features)
        if self.packed is not None:
            xu, xs, xlo = self.kernels.quantize_rows_uint8(x2.contiguous())  # [M, K] uint8 codes, [M], [M]
            return self._gemm(xu, xs, xlo, bias, res, dtype).reshape(*lead, self.out_features)
        xq, xs, xlo = quantize_per_token(x2, self.kernels)  # [M, K] int8, [M], [M]
        acc = torch._int_mm(xq, self.qweight)  # [M, K] x [K, N] -> [M, N] int32
        y = scaled_int8_epilogue(acc, xs, xlo, self.scale, self.w_sum, bias, res, dtype, self.kernels)
        return y.reshape(*lead, self.out_features)

    def forward_silu_mul(self, gate_up: torch.Tensor, bias: torch.Tensor | None,
                         residual: torch.Tensor | None) -> torch.Tensor | None:
        """(silu(gate) * up) W^T (+ bias) (+ residual) for gate_up [M, 2K] = [gate | up], the activation and its
        quantization one C++ pass (``silu_mul_quantize_uint8``). None where that path does not apply (no packed
        weight, or not bfloat16): the caller then runs ``silu_mul`` and ``forward``."""
        if self.packed is None or gate_up.dtype != torch.bfloat16 or gate_up.dim() != 2:
            return None
        xu, xs, xlo = self.kernels.silu_mul_quantize_uint8(gate_up.contiguous())  # [M, K] uint8, [M], [M]
        return self._gemm(xu, xs, xlo, bias, residual, gate_up.dtype)

    def _gemm(self, xu: torch.Tensor, xs: torch.Tensor, xlo: torch.Tensor, bias: torch.Tensor | None,
              residual: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """[M, K] uint8 codes with their [M] scales and minima -> [M, N] in dtype."""
        y = torch.empty(xu.shape[0], self.out_features, dtype=dtype)
        self.kernels.int8_gemm(xu, self.packed, self.comp, xs, xlo, self.scale, _as(bias, dtype),
                                    _as(residual, dtype), y)
        return y


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def _weight_only_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the weight-only kernels multiply in: bfloat16 for a float32 model (see the module docstring)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


INT8_PANEL = 32  # int8g_gemm's output channels per panel


def write_int8_panels(packed: torch.Tensor, scales: torch.Tensor, offset: int, groups: Int8Groups) -> None:
    """Rows ``offset:offset + len(groups)`` of a weight into int8g_gemm's layout, in place: ``packed`` [P, K/2, 32, 2]
    int8 (row n is channel n % 32 of panel n // 32; codes k and k + 1 adjacent) and ``scales`` [P, K/32, 2, 32]
    float16 (each group's 32 scales, then its 32 offsets)."""
    codes = packed.permute(0, 2, 1, 3)  # [P, 32, K/2, 2], a view
    sview = scales.permute(0, 3, 1, 2)  # [P, 32, G, 2], a view
    o = groups.offset if groups.offset is not None else torch.zeros_like(groups.scale)
    q, s = groups.q, torch.stack([groups.scale, o], dim=2).half()  # [N, G, 2]
    k = q.shape[1]
    row, end = offset, offset + q.shape[0]
    while row < end:
        p, c = divmod(row, INT8_PANEL)
        if c == 0 and end - row >= INT8_PANEL:  # whole panels: one copy
            n = (end - row) // INT8_PANEL * INT8_PANEL
            rows = slice(row - offset, row - offset + n)
            codes[p:p + n // INT8_PANEL] = q[rows].reshape(-1, INT8_PANEL, k // 2, 2)
            sview[p:p + n // INT8_PANEL] = s[rows].reshape(-1, INT8_PANEL, s.shape[1], 2)
        else:  # part of one panel
            n = min(end - row, INT8_PANEL - c)
            rows = slice(row - offset, row - offset + n)
            codes[p, c:c + n] = q[rows].reshape(n, k // 2, 2)
            sview[p, c:c + n] = s[rows]
        row += n


def pack_int8_groups(groups: Int8Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8Groups [N, K] -> (packed [ceil(N / 32), K / 2, 32, 2] int8, scales [ceil(N / 32), K / 32, 2, 32] float16),
    int8g_gemm's operands (channels past N zero)."""
    n, k = groups.shape
    panels = -(-n // INT8_PANEL)
    packed = torch.zeros(panels, k // 2, INT8_PANEL, 2, dtype=torch.int8)
    scales = torch.zeros(panels, k // INT8_GROUP_SIZE, 2, INT8_PANEL, dtype=torch.float16)
    write_int8_panels(packed, scales, 0, groups)
    return packed, scales


def pack_int4_panels(groups: Int4Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4Groups [N, K] -> (packed [ceil(N / 32), K / 2, 32] uint8, scales [ceil(N / 32), K / 32, 2, 32] float16),
    int4g_gemm_amx's operands: int8g_gemm's panels (pack_int8_groups of the groups as int8 codes q - 8 with offset
    ``zero``) with a channel's codes k = 2j and 2j + 1 as the low and the high nibble of one byte."""
    packed8, scales = pack_int8_groups(Int8Groups(groups.q.to(torch.int8) - 8, groups.scale, groups.zero))
    q = (packed8 + 8).to(torch.uint8)  # [P, K/2, 32, 2]; channels past N: code 8, zero scale
    return (q[..., 0] | (q[..., 1] << 4)).contiguous(), scales


class Int8Weight(QuantizedWeight):
    """Where the C++ kernels load and the activations are float32 or bfloat16: ``packed`` / ``scales`` in
    ``int8g_gemm``'s panels of 32 channels, written as the rows load (no staging copy, so a model never holds more
    than its packed weights and one checkpoint tensor); the input goes in as bfloat16 on a CPU with AVX512-BF16, as
    float32 elsewhere (the kernel's portable path). Without the kernels (no C++ compiler) the rows are quantized per
    channel as they load (float rows once; Q8_0 groups requantized) for ``torch._weight_int8pack_mm``: ``qweight``
    [N, K] and ``scale`` [N]."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        if in_features % INT8_GROUP_SIZE:
            raise ValueError(f"int8 needs in_features to be a multiple of {INT8_GROUP_SIZE}, got {in_features}")
        groups, panels = in_features // INT8_GROUP_SIZE, -(-out_features // INT8_PANEL)
        self.register_buffer("packed", None)  # [ceil(N / 32), K / 2, 32, 2] int8, on the kernel path
        self.register_buffer("scales", None)  # [ceil(N / 32), K / 32, 2, 32] float16 (scales, offsets), kernel path
        self.register_buffer("qweight", None)  # [N, K] int8, on the torch path
        self.register_buffer("scale", None)  # [N] (float32 while loading, then the kernel's dtype), on the torch path
        self.x_dtype: torch.dtype | None = None  # the kernel path's input dtype, set by finalize
        if self.kernels is not None:
            self.packed = torch.zeros(panels, in_features // 2, INT8_PANEL, 2, dtype=torch.int8)
            self.scales = torch.zeros(panels, groups, 2, INT8_PANEL, dtype=torch.float16)
        else:
            self.qweight = torch.empty(out_features, in_features, dtype=torch.int8)
            self.scale = torch.empty(out_features, dtype=torch.float32)

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        if self.packed is not None:
            groups = w if isinstance(w, Int8Groups) else quantize_int8_groups(_to_float(w))
            write_int8_panels(self.packed, self.scales, offset, groups)
        else:
            q, s = quantize_int8_rows(_to_float(w))
            self.qweight[offset:offset + q.shape[0]], self.scale[offset:offset + q.shape[0]] = q, s

    def finalize(self, dtype: torch.dtype) -> None:
        if self.packed is not None:
            if dtype in (torch.float32, torch.bfloat16):
                # the input's dtype for int8g_gemm, decided once: bfloat16 where the CPU has AVX512-BF16
                self.x_dtype = torch.bfloat16 if self.kernels.int8g_bf16_available() else torch.float32
                return
            # int8g_gemm takes float32 or bfloat16 activations: in another dtype the groups go per channel (one
            # layer's float copy at a time)
            self.qweight, self.scale = quantize_int8_rows(self.groups().dequantize())
            self.packed = self.scales = None
        self.scale = self.scale.to(_weight_only_dtype(dtype))  # torch's kernel takes its input's dtype

    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        if self.packed is not None:
            self.packed.random_(-127, 128, generator=generator)  # channels past N too: the kernel never stores them
            self.scales[:, :, 0].fill_(1e-3 / 127)  # offsets zero
        else:
            self.qweight.random_(-127, 128, generator=generator)
            self.scale.fill_(1e-3 / 127)
        self.finalize(dtype)

    def groups(self) -> Int8Groups:
        """The weight as int8 groups again (from the packed panels; on the torch path, its per-channel rows as groups
        with one scale per row)."""
        if self.packed is None:
            return Int8Groups(self.qweight, self.scale.float()[:, None].expand(-1, self.in_features // INT8_GROUP_SIZE))
        n, k = self.out_features, self.in_features
        q = self.packed.permute(0, 2, 1, 3).reshape(-1, k)[:n]  # [P, K/2, 32, 2] -> [P * 32, K]
        so = self.scales.permute(0, 3, 1, 2).reshape(-1, k // INT8_GROUP_SIZE, 2)[:n].float()  # [P, G, 2, 32] -> [N, G, 2]
        return Int8Groups(q, so[..., 0], so[..., 1])

    def column_absmax(self) -> torch.Tensor:
        """max |W[:, j]| of the dequantized weight: [in_features] float32 (SmoothQuant's weight statistic)."""
        return self.groups().dequantize().abs().amax(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.packed is not None:
            gemm = self.kernels.int8g_gemm_amx if self.amx else self.kernels.int8g_gemm  # same operands
            return _panel_gemm(gemm, x, self.x_dtype, self.packed, self.scales, bias, residual, self.out_features)
        xc = x.reshape(-1, self.in_features).to(self.scale.dtype)
        y = torch._weight_int8pack_mm(xc, self.qweight, self.scale).to(x.dtype)  # [M, N]
        return _add_bias_residual(y, bias, residual).reshape(*lead, self.out_features)


class Int4Weight(QuantizedWeight):
    """Staged as one uint8 per weight while loading (the packed layout tiles rows, so shards cannot be packed alone);
    ``finalize`` packs to two weights per byte for ``torch._weight_int4pack_mm_for_cpu`` and frees the staging.

    On a CPU with AMX (``amx``), in a float32 or bfloat16 model, the same groups go instead into ``int8g_gemm``'s
    panels of 32 channels with two 4-bit codes per byte (``pack_int4_panels``; the same bytes as torch's layout) and
    its float16 scales and offsets (``w = (q - 8) * scale + zero``: the offset is ``zero``), multiplied by
    ``int4g_gemm_amx``: each panel dequantized to bfloat16 once per task, then AMX tile products, as int8
    weight-only's AMX GEMM (4-10x torch's int4 kernel on the model's shapes; BENCHMARKS.md). float16 holds the scales to 11 significant
    bits where torch's kernel takes bfloat16's 8; a weight with a scale float16 cannot hold to that precision (a
    nonzero magnitude below 2^-14 or above 65504) keeps torch's kernel."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        if in_features % INT4_GROUP_SIZE:
            raise ValueError(f"int4 needs in_features to be a multiple of {INT4_GROUP_SIZE}, got {in_features}")
        groups = in_features // INT4_GROUP_SIZE
        self._q = torch.empty(out_features, in_features, dtype=torch.uint8)  # staging, [N, K]
        self._scale = torch.empty(out_features, groups, dtype=torch.float32)
        self._zero = torch.empty(out_features, groups, dtype=torch.float32)
        self.register_buffer("packed", None)  # [N, K / 2] uint8 once final (torch's int4 kernel)
        self.register_buffer("scales_and_zeros", None)  # [K / 32, N, 2] in the kernel's dtype once final
        self.register_buffer("panels", None)  # [ceil(N / 32), K / 2, 32] uint8 (two codes a byte), on the AMX path
        self.register_buffer("panel_scales", None)  # [ceil(N / 32), K / 32, 2, 32] float16, on the AMX path
        self.register_buffer("perm", None)  # [K] int64: the input's columns in the weight's order (GPTQ act-order)
        self._rows_loaded = 0

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        """Rows of the weight; Int4Groups load as they are. Every shard of a fused layer must have the same input
        permutation (none, or GPTQ act-order's: they share one input)."""
        groups = w if isinstance(w, Int4Groups) else quantize_int4_groups(_to_float(w))
        perm = groups.perm
        if self._rows_loaded and ((perm is None) != (self.perm is None)
                                  or (perm is not None and not torch.equal(perm, self.perm))):
            raise ValueError("the checkpoint tensors fused into one layer have different input channel orders "
                             "(act-order g_idx): they cannot share one input")
        self.perm = perm
        rows = slice(offset, offset + groups.q.shape[0])
        self._q[rows], self._scale[rows], self._zero[rows] = groups.q, groups.scale, groups.zero
        self._rows_loaded += groups.q.shape[0]

    def _float16_holds(self) -> bool:
        """Whether float16 holds the groups at least as well as bfloat16: every scale 0 or a normal float16 (11
        significant bits), every zero within float16's range (a zero below its normal range is off by at most 2^-25,
        under 1/1000 of the smallest such step)."""
        s, z = self._scale.abs(), self._zero.abs()
        return bool(((s == 0) | ((s >= 2.0**-14) & (s <= 65504))).all() and (z <= 65504).all())

    def finalize(self, dtype: torch.dtype) -> None:
        if (self.amx and self.kernels.amx_available() and dtype in (torch.float32, torch.bfloat16)
                and self._float16_holds()):
            self.panels, self.panel_scales = pack_int4_panels(Int4Groups(self._q, self._scale, self._zero))
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(self._q.to(torch.int32), 1)
            self.scales_and_zeros = torch.stack([self._scale.t(), self._zero.t()], dim=-1).to(
                _weight_only_dtype(dtype)).contiguous()
        del self._q, self._scale, self._zero

    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        self._q.copy_(torch.randint(0, 16, self._q.shape, generator=generator, dtype=torch.uint8))
        self._scale.fill_(1e-3 / 8)
        self._zero.zero_()
        self.finalize(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.panels is not None:
            return _panel_gemm(self.kernels.int4g_gemm_amx, x, torch.bfloat16, self.panels, self.panel_scales, bias,
                               residual, self.out_features)
        xc = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        y = torch._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)  # [M, N]
        y = y.to(x.dtype)
        return _add_bias_residual(y, bias, residual).reshape(*lead, self.out_features)


def _panel_gemm(gemm, x: torch.Tensor, x_dtype: torch.dtype, packed: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, residual: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The C++ panel GEMMs' call (int8g_gemm, int8g_gemm_amx, int4g_gemm_amx): x [..., K] in x_dtype times the packed
    weight, bias and residual added in the kernel, out in x's dtype [..., N]."""
    x2 = x.reshape(-1, x.shape[-1]).to(x_dtype).contiguous()  # [M, K]
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype)
    res = None if residual is None else residual.reshape(-1, out_features)
    gemm(x2, packed, scales, _as(bias, x.dtype), _as(res, x.dtype), y)
    return y.reshape(*x.shape[:-1], out_features)


def _add_bias_residual(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual.reshape(y.shape)
    return y


_WEIGHTS = {"w8a8": W8A8Weight, "int8": Int8Weight, "int4": Int4Weight}


def make_quantized_weight(quantization: str, out_features: int, in_features: int, kernels=None,
                          amx: bool = False, device: torch.device | None = None) -> QuantizedWeight:
    """``kernels``: the C++ module, or None for the torch paths; ``amx``: use its AMX kernels where a format has one
    (int8 weight-only's GEMM); ``device``: where ``fp8`` (model/fp8.py, the one format that runs on CUDA) lives."""
    if quantization == "fp8":
        from tokenmill.model.fp8 import FP8Weight

        return FP8Weight(out_features, in_features, kernels, amx, device)
    return _WEIGHTS[quantization](out_features, in_features, kernels, amx)
