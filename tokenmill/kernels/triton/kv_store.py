"""The step's K and V into the paged cache through ``slot_mapping``, in Triton: a program per BLOCK_T tokens, every KV
head of each.

A slot of -1 is skipped (the padding rows of a CUDA graph's fixed-size batch). A float8 cache gets K and V cast to
float8 e4m3 by torch first and the kernel copies bytes: Triton's interpreter rounds float32 -> float8 wrongly (7.78
became 4.0 in triton 3.9), and one path on GPU and under the interpreter keeps the tested code the code that runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_tokens, stride_kt, stride_vt,
              BLOCK_T: tl.constexpr, ROW: tl.constexpr, ROW_P: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BLOCK_T]
    slot = tl.load(slot_mapping_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    cols = tl.arange(0, ROW_P)
    ok = (slot[:, None] >= 0) & (cols[None, :] < ROW)  # [BLOCK_T, ROW_P]
    k = tl.load(k_ptr + tokens[:, None] * stride_kt + cols[None, :], mask=ok)
    v = tl.load(v_ptr + tokens[:, None] * stride_vt + cols[None, :], mask=ok)
    tl.store(k_cache_ptr + slot[:, None] * ROW + cols[None, :], k, mask=ok)
    tl.store(v_cache_ptr + slot[:, None] * ROW + cols[None, :], v, mask=ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k / v [num_tokens, num_kv_heads, head_dim] (each token's heads contiguous) into caches [num_blocks, block_size,
    num_kv_heads, head_dim] at ``slot_mapping`` [num_tokens] (block * block_size + offset; -1: not written)."""
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if k_cache.dtype != k.dtype:
        k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
    if k_cache.element_size() == 1:  # float8: bytes
        k, v = k.view(torch.uint8), v.view(torch.uint8)
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    assert k.stride(2) == 1 and k.stride(1) == k.shape[2] and v.stride(2) == 1 and v.stride(1) == v.shape[2]
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    row = k.shape[1] * k.shape[2]
    row_p = triton.next_power_of_2(row)
    block_t = min(max(1, 4096 // row_p), triton.next_power_of_2(num_tokens))
    _store_kv[(triton.cdiv(num_tokens, block_t),)](k, v, k_cache, v_cache, slot_mapping, num_tokens, k.stride(0),
                                                   v.stride(0), BLOCK_T=block_t, ROW=row, ROW_P=row_p)
