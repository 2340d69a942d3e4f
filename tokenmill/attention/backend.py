"""Attention over the paged KV cache: the metadata a step carries, the backend protocol and the torch backends.

KV cache layout, per layer: ``k_cache``/``v_cache`` of shape [num_blocks, block_size, num_kv_heads, head_dim], in the
model's dtype or float8 e4m3 (``kv_cache_dtype="fp8"``; every backend reads it back exactly and attends in q's dtype).
Token ``t`` of the flat batch is written to slot ``slot_mapping[t]`` (block * block_size + offset); a slot of -1 is
not written (padding rows of a CUDA graph's batch).

Batch layout: requests are laid out one after another in the flat batch; ``query_start_loc[i]:query_start_loc[i+1]``
are request i's new tokens, which are the last tokens of its ``seq_lens[i]`` cached ones. The first ``num_decodes``
requests have exactly one new token.

Backends (each an attention algorithm; an ``Ops`` family, ``tokenmill/ops/``, holds one as ``ops.attention``):
- ``ReferenceAttention`` loops over requests in plain torch ops, K/V written by ``index_copy_``: no compiled code
  anywhere, the oracle for every other backend.
- ``TorchPagedAttention`` batches the decodes into one masked attention over a gathered view of the cache and runs
  prefill chunks per request, in torch ops (any device).
- ``CpuKernelAttention`` (``ops/cpu_ops.py``) and ``TritonAttention`` (``ops/triton_ops.py``) run every token of the step
  in one call of their kernel.
Tests hold them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F



@dataclass
class AttentionMetadata:
    query_start_loc: list[int]  # [num_reqs + 1], host ints
    seq_lens: list[int]  # [num_reqs], context + new tokens, host ints
    num_decodes: int  # the first num_decodes requests have query length 1
    slot_mapping: torch.Tensor  # [num_tokens] int64
    block_tables: torch.Tensor  # [num_reqs, max_num_blocks] int64, padded with 0
    seq_lens_tensor: torch.Tensor  # [num_reqs] int64
    query_start_loc_tensor: torch.Tensor | None = None  # [num_reqs + 1] int64; built from the list when not given

    def query_start_loc_t(self) -> torch.Tensor:
        if self.query_start_loc_tensor is None:
            self.query_start_loc_tensor = torch.tensor(
                self.query_start_loc, dtype=torch.int64, device=self.seq_lens_tensor.device)
        return self.query_start_loc_tensor

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens)


class AttentionBackend(Protocol):
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,  # a query at position i sees keys i - window < j <= i (sliding window)
        softcap: float | None = None,  # scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def needs_window(meta: AttentionMetadata, window: int | None) -> bool:
    """Whether a sliding window changes this step: only a sequence longer than the window has keys outside it."""
    return window is not None and max(meta.seq_lens, default=0) > window


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor):
    """Writes the step's K and V into their slots in plain torch ops, cast to the cache's dtype (a float8 cache is
    written through a byte view: torch has no index_copy_ for float8). Every slot is a real one (padded batches are
    the Triton backend's)."""
    if k_cache.dtype != k.dtype:
        k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    for new, cache in ((k, k_cache), (v, v_cache)):
        if cache.element_size() == 1:  # float8: copied as bytes
            cache, new = cache.view(torch.uint8), new.contiguous().view(torch.uint8)
        cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, new)


def _gather_seq(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[seq_len, num_kv_heads, head_dim] view of one request's cached tokens."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:seq_len]


def _read_as(cache_rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Gathered cache rows in the queries' dtype (a float8 cache is read back exactly)."""
    return cache_rows if cache_rows.dtype == dtype else cache_rows.to(dtype)


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
    """Causal attention of q's tokens (the last len(q) of the sequence) over k/v (within ``window``, scores capped by
    ``softcap``). Shapes as in forward()."""
    q_len, seq_len = q.shape[0], k.shape[0]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, len, head_dim]
    if q_len == seq_len and window is None and softcap is None:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
        return out.transpose(0, 1)
    context = seq_len - q_len
    keys = torch.arange(seq_len, device=q.device)[None, :]
    pos = context + torch.arange(q_len, device=q.device)[:, None]  # each query's position
    mask = keys <= pos  # [q_len, seq_len]: key j is visible to query i when j <= its position
    if window is not None:
        mask &= keys > pos - window
    out = masked_attention(qt, kt, vt, mask, scale, softcap)
    return out.transpose(0, 1)  # [q_len, heads, head_dim]


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     softcap: float | None) -> torch.Tensor:
    """q [..., heads, q_len, D], k / v [..., kv_heads, len, D], mask broadcastable to [..., heads, q_len, len].
    SDPA when no softcap; else the scores, capped, then the softmax (as transformers' eager path computes them)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class ReferenceAttention:
    """One request at a time. Simple, slow, the oracle for every other backend."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for i in range(meta.num_reqs):
            self._prefill_one(i, q, k_cache, v_cache, meta, scale, out, window, softcap)
        return out

    @staticmethod
    def _prefill_one(i, q, k_cache, v_cache, meta, scale, out, window=None, softcap=None) -> None:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        seq_len = meta.seq_lens[i]
        keys = _read_as(_gather_seq(k_cache, meta.block_tables[i], seq_len), q.dtype)
        values = _read_as(_gather_seq(v_cache, meta.block_tables[i], seq_len), q.dtype)
        out[start:end] = _attend_one(q[start:end], keys, values, scale, window, softcap)


class TorchPagedAttention(ReferenceAttention):
    """Decodes batched into one masked attention over a gathered view of the cache; prefill chunks one request at a
    time (the reference path)."""

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale, window, softcap)
        for i in range(nd, meta.num_reqs):
            self._prefill_one(i, q, k_cache, v_cache, meta, scale, out, window, softcap)
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        nd = q.shape[0]
        block_size = k_cache.shape[1]
        max_len = max(meta.seq_lens[:nd])
        num_blocks = -(-max_len // block_size)
        tables = meta.block_tables[:nd, :num_blocks]  # [nd, num_blocks]
        keys = _read_as(k_cache[tables].flatten(1, 2)[:, :max_len], q.dtype).transpose(1, 2)  # [nd, kv_heads, len, D]
        values = _read_as(v_cache[tables].flatten(1, 2)[:, :max_len], q.dtype).transpose(1, 2)
        keys_at = torch.arange(max_len, device=q.device)[None, :]
        valid = keys_at < meta.seq_lens_tensor[:nd, None]  # [nd, max_len]
        if window is not None:  # the decode token sits at seq_len - 1
            valid &= keys_at > meta.seq_lens_tensor[:nd, None] - 1 - window
        out = masked_attention(q.unsqueeze(2), keys, values, valid[:, None, None, :], scale, softcap)
        return out.squeeze(2)  # [nd, heads, head_dim]
