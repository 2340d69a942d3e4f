"""Grouped GEMMs in Triton: runs of rows, each times its own weight, in one launch (vLLM's fused-MoE shape; punica's
segmented GEMM for LoRA).

A run is (weight index, first row, end row) over ``xs``. The host cuts every run into blocks of BLOCK_M rows and
hands the kernel one (weight index, first row, end of the run) triple per block; a program takes one block and
BLOCK_N output columns, and walks K in BLOCK_K steps with ``tl.dot`` against its weight's tile. Rows outside every
run are neither read nor written; a block never mixes two runs. Users: the experts of a mixture-of-experts layer
(``moe.py``: runs are the experts' rows, grouped by expert) and LoRA updates (``model/lora.py``: runs are each
adapter's rows of the step, the shrink into a rank-R buffer, then the expand added to the layer's output).

Weights are stacked [num_weights, N, K] (each a Linear weight, [out, in]): y = x W^T for a run's rows. Accumulation in
float32 (IEEE in float32: no TF32, so float32 results match torch's), rounded once to the output's dtype (with
``accumulate``, after adding what the output held). The interpreter (``TRITON_INTERPRET=1``) runs the same code on CPU
tensors: that is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_linear(
    x_ptr, w_ptr, out_ptr, blocks_ptr,  # blocks: [3, num_blocks] int32: expert, first row, end of the run
    num_blocks, N, K,
    stride_xm, stride_we, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
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
    ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=ok, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


def run_blocks(runs: list[tuple[int, int, int]], block_m: int, device: torch.device) -> torch.Tensor:
    """[3, num_blocks] int32: for every BLOCK_M rows of every run (weight index, first row, end row), (weight index,
    first row of the block, end of the run)."""
    table = [(w, r, end) for w, first, end in runs for r in range(first, end, block_m)]
    return torch.tensor(table, dtype=torch.int32).reshape(-1, 3).t().contiguous().to(device, non_blocking=True)


def expert_blocks(counts: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """``run_blocks`` of rows grouped by expert: expert e's run is ``counts[e]`` rows after the runs before it."""
    ends = [sum(counts[:e + 1]) for e in range(len(counts))]
    return run_blocks([(e, end - c, end) for e, (c, end) in enumerate(zip(counts, ends)) if c], block_m, device)


def grouped_linear(xs: torch.Tensor, counts: list[int] | None, weight: torch.Tensor,
                   blocks: torch.Tensor | None = None, block_m: int = 16, out: torch.Tensor | None = None,
                   accumulate: bool = False) -> torch.Tensor:
    """xs [rows, K] grouped by expert (``counts`` rows each), weight [num_experts, N, K] -> [rows, N]: each run of
    rows times its expert's weight, transposed. ``blocks``: ``expert_blocks(counts, block_m)`` when the caller reuses
    it for another projection, or any ``run_blocks`` (then ``counts`` may be None, and rows outside the runs are
    neither read nor written). ``out`` [rows, N]: written (``accumulate``: added to) instead of a new tensor."""
    rows, K = xs.shape
    num_experts, N, K_w = weight.shape
    assert K_w == K and (counts is None or (len(counts) == num_experts and sum(counts) == rows)), \
        (xs.shape, weight.shape, counts)
    assert xs.stride(-1) == 1 and weight.stride(-1) == 1 and weight.dtype == xs.dtype
    if out is None:
        assert not accumulate
        out = torch.empty(rows, N, dtype=xs.dtype, device=xs.device)
    assert out.shape == (rows, N) and out.stride(-1) == 1
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
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=xs.dtype == torch.float32, ACCUMULATE=accumulate,
    )
    return out
