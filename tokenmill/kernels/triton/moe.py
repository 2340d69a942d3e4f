"""The experts of a mixture-of-experts layer in Triton: one grouped GEMM launch per projection (vLLM's fused-MoE
shape), instead of two GEMM launches per expert from Python.

Rows arrive grouped by expert (``model/moe.group_by_expert``): expert e's rows are one contiguous run of ``xs``,
``counts[e]`` long. The host cuts every run into blocks of BLOCK_M rows (it holds the counts already: the layer reads
them once to group the rows) and hands the kernel one (expert, first row, end of the run) triple per block; a program
takes one such block and BLOCK_N output columns, and walks K in BLOCK_K steps with ``tl.dot`` against its expert's
weight tile. Experts no row chose cost nothing; a block never mixes two experts.

Weights are stacked [num_experts, N, K] (each expert's Linear weight, [out, in]): y = x W_e^T for the rows of expert
e. Accumulation in float32 (IEEE in float32: no TF32, so float32 results match torch's), rounded once to x's dtype.
The interpreter (``TRITON_INTERPRET=1``) runs the same code on CPU tensors: that is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.activation import silu_mul


@triton.jit
def _grouped_linear(
    x_ptr, w_ptr, out_ptr, blocks_ptr,  # blocks: [3, num_blocks] int32: expert, first row, end of the run
    num_blocks, N, K,
    stride_xm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    expert = tl.load(blocks_ptr + b).to(tl.int64)
    row0 = tl.load(blocks_ptr + num_blocks + b)
    row_end = tl.load(blocks_ptr + 2 * num_blocks + b)
    rows = row0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_ok = rows < row_end
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def expert_blocks(counts: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """[3, num_blocks] int32: for every BLOCK_M rows of every expert's run, (expert, first row, end of the run)."""
    experts, firsts, ends = [], [], []
    start = 0
    for e, count in enumerate(counts):
        end = start + count
        for r in range(start, end, block_m):
            experts.append(e)
            firsts.append(r)
            ends.append(end)
        start = end
    return torch.tensor([experts, firsts, ends], dtype=torch.int32).to(device, non_blocking=True)


def grouped_linear(xs: torch.Tensor, counts: list[int], weight: torch.Tensor,
                   blocks: torch.Tensor | None = None, block_m: int = 16) -> torch.Tensor:
    """xs [rows, K] grouped by expert (``counts`` rows each), weight [num_experts, N, K] -> [rows, N]: each run of
    rows times its expert's weight, transposed. ``blocks``: ``expert_blocks(counts, block_m)``, when the caller
    reuses it for another projection."""
    rows, K = xs.shape
    num_experts, N, K_w = weight.shape
    assert K_w == K and len(counts) == num_experts and sum(counts) == rows, (xs.shape, weight.shape, len(counts))
    assert xs.stride(-1) == 1 and weight.stride(-1) == 1 and weight.dtype == xs.dtype
    out = torch.empty(rows, N, dtype=xs.dtype, device=xs.device)
    if blocks is None:
        blocks = expert_blocks(counts, block_m, xs.device)
    num_blocks = blocks.shape[1]
    if num_blocks == 0:
        return out
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_k = min(64, max(16, triton.next_power_of_2(K)))
    _grouped_linear[(num_blocks, triton.cdiv(N, block_n))](
        xs, weight, out, blocks, num_blocks, N, K,
        xs.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=xs.dtype == torch.float32,
    )
    return out


def fused_experts(xs: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Every expert's SiLU-gated MLP over its run of xs [rows, hidden]: gate|up [E, 2I, hidden], down [E, hidden, I]
    -> [rows, hidden]. Three launches whatever the number of experts."""
    block_m = 16 if len(xs) <= 64 * len(counts) else 64  # decode-sized runs: small blocks waste fewer rows
    blocks = expert_blocks(counts, block_m, xs.device)
    h = grouped_linear(xs, counts, w_gate_up, blocks, block_m)  # [rows, 2I]
    return grouped_linear(silu_mul(h), counts, w_down, blocks, block_m)  # [rows, hidden]
