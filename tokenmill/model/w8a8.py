"""w8a8: int8 weights and 8-bit activations (``make_quantized_weight("w8a8", ...)``; the common part is in
``model/quant.py``).

- ``w8a8``: int8 weights, symmetric per output channel; activations quantized to 8 bits per token on the fly
  (asymmetric: 256 levels from the token's minimum to its maximum, which costs less perplexity than symmetric absmax
  codes; BENCHMARKS.md), multiplied with int32 accumulation, then ``(acc * x_scale[token] + z[token] *
  w_sum[channel]) * w_scale[channel]``, where ``z`` is the value of code 0 and ``w_sum`` each channel's sum of codes.
  On a CPU with AVX512-VNNI the weight is packed once for the C++ kernels' ``int8_gemm`` (VNNI tiles, the scales,
  zero points, bias and residual fused into its stores), and with AMX (``amx``) ``int8_gemm_amx`` runs the same
  operands on AMX-INT8 tiles (the same result bit for bit; 2-3x VNNI's rate from 16 rows); elsewhere the int32
  sums come from the C++ kernels' ``int8_mm`` on AVX2 (torch._int_mm's sums exactly, ~100x its rate on an AVX2-only
  CPU) or ``torch._int_mm``, then a separate epilogue pass. The throughput mode.
"""

from __future__ import annotations

import torch

from tokenmill.model.quant import Int4Groups, Int8Groups, QuantizedWeight, as_dtype, quantize_int8_rows, to_float


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


class W8A8Weight(QuantizedWeight):
    """``qweight`` is [N, K] while loading. Once final, where the C++ kernels run ``int8_gemm`` (a CPU with
    AVX512-VNNI, K a multiple of 4, float32 or bfloat16 activations): ``packed`` / ``comp`` (``int8_pack_weight``)
    and no ``qweight``; elsewhere ``w_sum`` holds the channels' sums of codes (the epilogue's term for the
    activations' zero point) and the weight is ``mm_packed`` (``int8_mm_pack``: AVX2, K a multiple of 4) or else
    ``qweight`` [K, N] contiguous (``torch._int_mm``'s faster layout)."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))  # [N, K]
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))  # [N]
        self.register_buffer("packed", None)  # [ceil(N / 64), K / 4, 64, 4] int8 once final, on the kernel path
        self.register_buffer("comp", None)  # [ceil(N / 64) * 64] int32: 128 * each channel's sum of codes
        self.register_buffer("w_sum", None)  # [N] float32: each channel's sum of codes (the int32-sums path)
        self.register_buffer("mm_packed", None)  # [ceil(N / 16), K / 4, 16, 4] int8: int8_mm's panels (AVX2)
        self.fused_argmax = False  # whether argmax() runs (set by finalize)

    def finalize(self, dtype: torch.dtype) -> None:
        kernels = self.kernels
        if (kernels is not None and kernels.int8_gemm_available() and self.in_features % 4 == 0
                and dtype in (torch.float32, torch.bfloat16)):
            self.packed, self.comp = kernels.int8_pack_weight(self.qweight.contiguous())
            self.qweight = None
            # the fused greedy head (argmax) runs: AMX-INT8 tiles here and on the layer's path, K in whole tiles
            self.fused_argmax = self.amx and self.in_features % 64 == 0 and kernels.amx_int8_available()
        else:
            self.w_sum = self.qweight.sum(dim=1, dtype=torch.int32).float()
            if kernels is not None and kernels.int8_mm_available() and self.in_features % 4 == 0:
                self.mm_packed = kernels.int8_mm_pack(self.qweight.contiguous())
                self.qweight = None
            else:
                self.qweight = self.qweight.t().contiguous()  # [K, N]

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        q, s = quantize_int8_rows(to_float(w))
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
        if self.mm_packed is not None:
            acc = self.kernels.int8_mm(xq, self.mm_packed, self.out_features)  # [M, N] int32, torch._int_mm's sums
        else:
            acc = torch._int_mm(xq, self.qweight)  # [M, K] x [K, N] -> [M, N] int32
        y = scaled_int8_epilogue(acc, xs, xlo, self.scale, self.w_sum, bias, res, dtype, self.kernels)
        return y.reshape(*lead, self.out_features)

    def argmax(self, x: torch.Tensor) -> torch.Tensor | None:
        """[M, K] -> [M] int64: each row's argmax over ``forward(x, None, out_dtype=float32)``, the first of equal
        maxima, without writing that output (``int8_gemm_argmax``: a greedy LM head). None where the fused kernel
        does not run (no AMX-INT8 here, the layer not on the AMX path, K not a multiple of 64): the caller computes
        the logits."""
        if self.packed is None or not self.fused_argmax or x.dim() != 2:
            return None
        xu, xs, xlo = self.kernels.quantize_rows_uint8(x.contiguous())  # [M, K] uint8, [M], [M]
        return self.kernels.int8_gemm_argmax(xu, self.packed, self.comp, xs, xlo, self.scale, self.out_features)

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
        gemm = self.kernels.int8_gemm_amx if self.amx else self.kernels.int8_gemm  # same operands, same result
        gemm(xu, self.packed, self.comp, xs, xlo, self.scale, as_dtype(bias, dtype), as_dtype(residual, dtype), y)
        return y
