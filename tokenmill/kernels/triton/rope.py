"""Rotary embedding on q and k in place, in Triton (HF's rotate-half layout). out[:h] = x[:h] cos - x[h:] sin,
out[h:] = x[h:] cos + x[:h] sin (h = head_dim / 2), computed in float32 and rounded once to the input's dtype (the
torch ops round each product in that dtype: equal in float32, within a last bit in float16). A program takes BLOCK_T
tokens, every head of q and of k: a tile [BLOCK_T, heads x h] per half."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_heads(x_ptr, stride_t, stride_h, num_heads, tokens, cos_ptr, sin_ptr, stride_ct, num_tokens,
                HALF: tl.constexpr, HALF_P: tl.constexpr, HEADS_P: tl.constexpr):
    cols = tl.arange(0, HEADS_P * HALF_P)  # head * HALF_P + i
    head = cols // HALF_P
    i = cols % HALF_P
    ok = (tokens[:, None] < num_tokens) & (head[None, :] < num_heads) & (i[None, :] < HALF)  # [BLOCK_T, COLS]
    cs = tokens[:, None] * stride_ct + i[None, :]
    cos = tl.load(cos_ptr + cs, mask=ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + cs, mask=ok, other=0.0).to(tl.float32)
    ptr = x_ptr + tokens[:, None] * stride_t + head[None, :] * stride_h + i[None, :]
    x1 = tl.load(ptr, mask=ok, other=0.0)
    x2 = tl.load(ptr + HALF, mask=ok, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr, (a * cos - b * sin).to(x1.dtype), mask=ok)
    tl.store(ptr + HALF, (b * cos + a * sin).to(x1.dtype), mask=ok)


@triton.jit
def _rope(q_ptr, k_ptr, cos_ptr, sin_ptr, num_tokens, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
          num_heads, num_kv_heads, BLOCK_T: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr,
          HEADS_P: tl.constexpr, KV_HEADS_P: tl.constexpr):
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BLOCK_T]
    _rope_heads(q_ptr, stride_qt, stride_qh, num_heads, tokens, cos_ptr, sin_ptr, stride_ct, num_tokens,
                HALF, HALF_P, HEADS_P)
    _rope_heads(k_ptr, stride_kt, stride_kh, num_kv_heads, tokens, cos_ptr, sin_ptr, stride_ct, num_tokens,
                HALF, HALF_P, KV_HEADS_P)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [num_tokens, heads, head_dim], k [num_tokens, kv_heads, head_dim] (head_dim contiguous; views of the fused
    qkv output are fine), cos / sin [num_tokens, head_dim] (halves equal; only the first is read). Rotates q and k in
    place and returns them."""
    num_tokens, num_heads, head_dim = q.shape
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride() == sin.stride()
    if num_tokens:
        half = head_dim // 2
        half_p, heads_p = triton.next_power_of_2(half), triton.next_power_of_2(num_heads)
        block_t = min(max(1, 4096 // (heads_p * half_p)), triton.next_power_of_2(num_tokens))
        _rope[(triton.cdiv(num_tokens, block_t),)](
            q, k, cos, sin, num_tokens, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
            num_heads, k.shape[1], BLOCK_T=block_t, HALF=half, HALF_P=half_p, HEADS_P=heads_p,
            KV_HEADS_P=triton.next_power_of_2(k.shape[1]))
    return q, k
