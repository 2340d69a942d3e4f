"""RMSNorm in Triton, in float32 whatever the input dtype, in transformers' order (normalise in float32, cast back to
the input's dtype, then times the weight), so it matches ``TorchOps.rms_norm``. A program takes BLOCK_R rows: one
for a hidden-size row, several for q/k-norm's head-sized rows (a program per 128-wide row would mostly wait)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, num_rows, stride_x, stride_o, dim, eps, BLOCK_R: tl.constexpr,
              BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BLOCK_R]
    cols = tl.arange(0, BLOCK)
    ok = (rows[:, None] < num_rows) & (cols[None, :] < dim)  # [BLOCK_R, BLOCK]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, 1) / dim  # [BLOCK_R]
    y = (xf * (1.0 / tl.sqrt(var + eps))[:, None]).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0)
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], (w[None, :] * y).to(out_ptr.dtype.element_ty),
             mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] (last dim contiguous), weight [dim] -> [..., dim] in torch's promotion of (weight, x)."""
    shape = x.shape
    dim = shape[-1]
    x2 = x.reshape(-1, dim)
    num_rows = x2.shape[0]
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if num_rows:
        block = triton.next_power_of_2(dim)
        block_r = min(max(1, 2048 // block), triton.next_power_of_2(num_rows))
        _rms_norm[(triton.cdiv(num_rows, block_r),)](x2, weight, out, num_rows, x2.stride(0), out.stride(0), dim, eps,
                                                     BLOCK_R=block_r, BLOCK=block)
    return out.view(shape)
