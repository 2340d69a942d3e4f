"""Paged attention in Triton: every token of a step (decodes, prefill chunks with their causal offsets, prefix-cache
hits) in one launch, reading K/V through the block tables, optionally split over the context (flash-decoding).

Layout (``attention/backend.py``): q [num_tokens, num_heads, head_dim]; caches [num_blocks, block_size, num_kv_heads,
head_dim] in q's dtype or float8 e4m3; request i's new tokens are q[query_start_loc[i]:query_start_loc[i+1]], the last
of its seq_lens[i] cached ones; its j-th cached token lives in block block_tables[i, j // block_size] at offset
j % block_size.

Grid: (q blocks, KV heads, splits). A program takes BLOCK_Q consecutive query tokens of one request and all GROUP
query heads of one KV head (GQA: the GROUP heads share every K/V tile), BLOCK_M = BLOCK_Q * GROUP rows padded to a
power of two. Which request a program serves is found in the kernel by a binary search over query_start_loc: request
i owns q blocks [query_start_loc[i] // BLOCK_Q + i, query_start_loc[i+1] // BLOCK_Q + i + 1), at least
ceil(q_len / BLOCK_Q) of them (the spare one exits at once), so the grid needs only num_tokens // BLOCK_Q + num_reqs
blocks: host ints, no per-step host work (and a fixed grid for a CUDA graph).

Each program walks its keys in tiles of TILE_N tokens, gathering every token's slot from the block table (so TILE_N
is free of the cache's block size), with an online softmax in float32. Query at position p (context + its index in
the chunk) sees keys 0..p; with a sliding window (``window`` > 0, Mistral, Gemma's local layers) only keys
p - window < j <= p. A program visits only the tiles between the first key its first row sees and the last key its
last row sees. Capped scores (``softcap`` > 0, Gemma 2): s -> softcap * tanh(s / softcap) before the softmax.

Split-KV (NUM_SPLITS > 1; decodes over long contexts, where one program per (request, KV head) leaves most of a GPU
idle): split s walks its share of the tiles and stores its unnormalised accumulator with the running max and sum
(float32); ``_reduce_splits`` rescales and sums them into the output. One kernel serves both, so the split path is
the same code the unsplit one tests.

Matmuls: ``tl.dot`` over [BLOCK_M, HEAD_DIM] x [HEAD_DIM, TILE_N]; in float32 with IEEE precision (no TF32), so
float32 results match the torch oracle. The cache's float8 values are converted exactly to q's dtype. The
interpreter (``TRITON_INTERPRET=1``) runs the same code on CPU tensors: that is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    """The request i with query_start_loc[i] // BLOCK_Q + i <= q_block < the same for i + 1 (binary search)."""
    lo: tl.int32 = 0  # typed: a loop-carried variable keeps one type
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tanh(x):
    """tanh in float32 from one exp of a non-positive argument (no overflow; the interpreter has no tanh)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _paged_attention(
    out_ptr,  # [num_tokens, num_heads, head_dim]; or, split: [NUM_SPLITS, num_tokens, num_heads, HEAD_DIM_P] fp32
    max_ptr,  # split only: [NUM_SPLITS, num_tokens, num_heads] fp32 running max (else unused)
    sum_ptr,  # split only: [NUM_SPLITS, num_tokens, num_heads] fp32 running sum
    q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    num_reqs, num_tokens, num_heads, scale, window, softcap,
    stride_qt, stride_qh,  # q: token, head (head_dim contiguous)
    stride_ot, stride_oh,  # out: token, head
    stride_cb, stride_cs, stride_ch,  # caches: block, slot in block, kv head
    stride_bt,  # block tables: request
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    KV_FP8: tl.constexpr, IEEE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req = _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    first_q = (q_block - (q_start // BLOCK_Q + req)) * BLOCK_Q  # index in the chunk of this program's first query
    if first_q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)  # [BLOCK_M]: row = query token * GROUP + head in the group
    q_idx = first_q + rows // GROUP  # [BLOCK_M] index in the chunk
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M]
    row_ok = (rows < BLOCK_Q * GROUP) & (q_idx < q_len)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BLOCK_M, HEAD_DIM_P]
    q_pos = context + q_idx  # [BLOCK_M] the last key each row sees

    last_q = tl.minimum(first_q + BLOCK_Q, q_len) - 1
    num_keys = context + last_q + 1  # keys any row of this program sees
    num_tiles = tl.cdiv(num_keys, TILE_N)
    first_tile = 0
    if HAS_WINDOW:  # the tile of the first key this program's first row sees
        first_tile = tl.maximum(context + first_q - window + 1, 0) // TILE_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, NUM_SPLITS)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    table = block_tables_ptr + req.to(tl.int64) * stride_bt
    cols = tl.arange(0, TILE_N)
    for tile in range(tile_lo, tile_hi):
        key = tile * TILE_N + cols  # [TILE_N]
        key_ok = key < num_keys
        block = tl.load(table + key // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slot = block * stride_cb + (key % BLOCK_SIZE) * stride_cs + kv_head * stride_ch  # [TILE_N]
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [TILE_N, HEAD_DIM_P]
        v = tl.load(v_cache_ptr + slot[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:  # float8 cache: exact in float32, then in q's dtype
            k = k.to(tl.float32).to(q.dtype)
            v = v.to(tl.float32).to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, TILE_N]
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        visible = (key[None, :] <= q_pos[:, None]) & key_ok[None, :]
        if HAS_WINDOW:
            visible = visible & (key[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # (l_i is 0 only on padding rows, which are not stored)
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        # partial results: [NUM_SPLITS, num_tokens, num_heads(, HEAD_DIM_P)], contiguous
        cell = (split * num_tokens + token) * num_heads + head  # [BLOCK_M]
        tl.store(max_ptr + cell, m_i, mask=row_ok)
        tl.store(sum_ptr + cell, l_i, mask=row_ok)
        tl.store(out_ptr + cell[:, None] * HEAD_DIM_P + dims[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _reduce_splits(
    out_ptr, acc_ptr, max_ptr, sum_ptr, num_tokens, num_heads, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    """out[t, h] = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, M = max_s m_s; an empty split has m_s = -inf."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, HEAD_DIM_P)
    cell = (splits * num_tokens + token) * num_heads + head  # [NUM_SPLITS]
    m = tl.load(max_ptr + cell)
    l = tl.load(sum_ptr + cell)
    m_all = tl.max(m, 0)
    w = tl.exp(m - m_all)  # [NUM_SPLITS]
    acc = tl.load(acc_ptr + cell[:, None] * HEAD_DIM_P + dims[None, :])  # [NUM_SPLITS, HEAD_DIM_P]
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_reqs, max_blocks] int32 / int64
    seq_lens: torch.Tensor,  # [num_reqs] int
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int
    scale: float,
    max_query_len: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """The step's attention (module docstring). ``max_query_len`` (a host int) picks the query tile: decode-only steps
    use one query token per program. ``num_splits`` (a power of two) splits every program's keys. ``out`` may be
    given (a persistent buffer); its rows beyond query_start_loc[-1] (padding) are undefined. ``window``: a query at
    position p sees keys p - window < j <= p; ``softcap``: scores capped as softcap * tanh(s / softcap)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_reqs = seq_lens.shape[0]
    assert q.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert num_heads % num_kv_heads == 0 and num_splits & (num_splits - 1) == 0
    assert k_cache.dtype in (q.dtype, torch.float8_e4m3fn), (k_cache.dtype, q.dtype)
    assert window is None or window >= 1, window
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    head_dim_p = triton.next_power_of_2(head_dim)
    rows = 16 if max_query_len == 1 else 64
    block_q = max(1, rows // group)
    block_m = max(16, triton.next_power_of_2(block_q * group))
    tile_n = 32 if head_dim_p >= 256 else 64
    grid = (num_tokens // block_q + num_reqs, num_kv_heads, num_splits)
    if num_splits == 1:
        partial = max_ = sum_ = out
    else:
        partial = torch.empty(num_splits, num_tokens, num_heads, head_dim_p, dtype=torch.float32, device=q.device)
        max_ = torch.empty(num_splits, num_tokens, num_heads, dtype=torch.float32, device=q.device)
        sum_ = torch.empty_like(max_)
    _paged_attention[grid](
        partial, max_, sum_, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        num_reqs, num_tokens, num_heads, scale, window or 0, float(softcap or 0.0),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_Q=block_q, BLOCK_M=block_m, TILE_N=tile_n, NUM_SPLITS=num_splits,
        KV_FP8=k_cache.element_size() == 1, IEEE=q.dtype == torch.float32,
        HAS_WINDOW=window is not None, HAS_SOFTCAP=softcap is not None,
    )
    if num_splits > 1:
        _reduce_splits[(num_tokens, num_heads)](
            out, partial, max_, sum_, num_tokens, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, NUM_SPLITS=num_splits,
        )
    return out


def choose_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, num_programs_target: int = 256,
                      min_keys_per_split: int = 256) -> int:
    """Splits for a decode-only step: enough programs to fill ``num_programs_target`` (about two per SM on an H100
    / H200), each with at least ``min_keys_per_split`` keys; 1 where the step already has enough programs."""
    programs = num_decodes * num_kv_heads
    splits = 1
    while programs * splits * 2 <= num_programs_target and max_seq_len // (splits * 2) >= min_keys_per_split:
        splits *= 2
    return splits
