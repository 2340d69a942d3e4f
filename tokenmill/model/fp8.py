"""``fp8``: float8 e4m3 weights with a scale per output channel, activations cast to float8 per token on the fly.

Seed 003's "fp8 halves the weight bytes" in the GPU form: one ``torch._scaled_mm`` per linear layer (Hopper's fp8
tensor cores on CUDA; torch's reference kernel on a CPU, where it is correct but not fast: the form the tests check)

    y[m, n] = sum_k q_x[m, k] q_w[n, k] * x_scale[m] * w_scale[n]   (+ bias) (+ residual)

with ``w_scale[n] = max_k |w[n, k]| / 448`` (448: e4m3's largest finite value) and ``x_scale[m]`` the same over the
token's row, both float32; codes are ``round(value / scale)`` to e4m3 (torch's cast: round to nearest even). Rows
are independent, so a fused weight's shards quantize alone as they load (``load_rows``), like ``int8``'s groups.
Shapes ``_scaled_mm`` cannot take (K or N not a multiple of 16) multiply the dequantized weight instead, the same
numbers up to summation order. Which layers: every linear but the LM head and the embeddings, as with int8 / int4.
"""

from __future__ import annotations

import torch

from tokenmill.model.quant import Int4Groups, Int8Groups, QuantizedWeight, add_bias_residual, to_float

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
_MIN_SCALE = 1e-12  # a row of zeros keeps a finite scale


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] float -> ([M, K] e4m3 codes, [M] float32 scales): ``x ~= codes * scale[:, None]``."""
    x = x.float()
    scale = (x.abs().amax(dim=-1) / FP8_MAX).clamp_min(_MIN_SCALE)  # [M]
    return (x / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Weight(QuantizedWeight):
    """``qweight`` [N, K] e4m3 and ``scale`` [N] float32, on the model's device."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False,
                 device: torch.device | None = None) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=FP8, device=device))  # [N, K]
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32, device=device))  # [N]
        self.scaled_mm = in_features % 16 == 0 and out_features % 16 == 0  # what _scaled_mm's shapes allow

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        q, s = quantize_fp8_rows(to_float(w).to(self.qweight.device))
        self.qweight[offset:offset + q.shape[0]] = q
        self.scale[offset:offset + q.shape[0]] = s

    def finalize(self, dtype: torch.dtype) -> None:
        pass  # _scaled_mm takes qweight.t(): [K, N] column-major, as it wants its second operand

    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        w = torch.empty(self.qweight.shape, device=self.qweight.device).uniform_(-1.0, 1.0, generator=generator)
        self.qweight.copy_((w * FP8_MAX).to(FP8))
        self.scale.fill_(1e-3 / FP8_MAX)

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        xq, xs = quantize_fp8_rows(x2)  # [M, K] e4m3, [M]
        if self.scaled_mm:
            # CUDA's row-wise scaled GEMM writes bfloat16; the CPU kernel writes the activations' dtype
            out_dtype = torch.bfloat16 if x.is_cuda else dtype
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs[:, None], scale_b=self.scale[None, :],
                                 out_dtype=out_dtype).to(dtype)  # [M, N]
        else:
            y = ((xq.float() * xs[:, None]) @ self.dequantize().t()).to(dtype)  # [M, N]
        return add_bias_residual(y, bias, residual).reshape(*lead, self.out_features)
