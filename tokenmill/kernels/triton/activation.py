"""SiLU-and-mul in Triton: [rows, 2I] = [gate | up] -> [rows, I] silu(gate) * up, in float32, rounded once; a program
takes a [BLOCK_R, BLOCK] tile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul(x_ptr, out_ptr, num_rows, stride_x, stride_o, inter, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]  # [BLOCK_R, 1]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]  # [1, BLOCK]
    ok = (rows < num_rows) & (cols < inter)
    gate = tl.load(x_ptr + rows * stride_x + cols, mask=ok, other=0.0)
    up = tl.load(x_ptr + rows * stride_x + inter + cols, mask=ok, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * up
    tl.store(out_ptr + rows * stride_o + cols, y.to(gate.dtype), mask=ok)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[rows, 2I] (last dim contiguous) -> [rows, I]."""
    rows, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = min(1024, triton.next_power_of_2(inter))
        block_r = min(max(1, 4096 // block), triton.next_power_of_2(rows))
        _silu_mul[(triton.cdiv(rows, block_r), triton.cdiv(inter, block))](
            gate_up, out, rows, gate_up.stride(0), out.stride(0), inter, BLOCK_R=block_r, BLOCK=block)
    return out
