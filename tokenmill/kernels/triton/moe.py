"""The experts of a mixture-of-experts layer in Triton: two grouped GEMM launches and one SiLU-and-mul
(``grouped.py``), instead of two GEMM launches per expert from Python.

Rows arrive grouped by expert (``model/moe.group_by_expert``): expert e's rows are one contiguous run of ``xs``,
``counts[e]`` long; the host cuts the runs into blocks from the counts the layer already reads. Experts no row chose
cost nothing. Weights stacked [num_experts, N, K] per projection.
"""

from __future__ import annotations

import torch

from tokenmill.kernels.triton.activation import silu_mul
from tokenmill.kernels.triton.grouped import expert_blocks, grouped_linear


def fused_experts(xs: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Every expert's SiLU-gated MLP over its run of xs [rows, hidden]: gate|up [E, 2I, hidden], down [E, hidden, I]
    -> [rows, hidden]. Three launches whatever the number of experts."""
    block_m = 16 if len(xs) <= 64 * len(counts) else 64  # decode-sized runs: small blocks waste fewer rows
    blocks = expert_blocks(counts, block_m, xs.device)
    h = grouped_linear(xs, counts, w_gate_up, blocks, block_m)  # [rows, 2I]
    return grouped_linear(silu_mul(h), counts, w_down, blocks, block_m)  # [rows, hidden]
