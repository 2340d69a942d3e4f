"""Attention over packed variable-length sequences with no KV cache: the embedding path's attention.

A packed batch is the tokens of many sequences laid end to end ([num_tokens, ...]); ``seq_lens`` says where each
ends. Nothing is padded. The ops family runs it (``ops.packed_attention``): on the C++ kernels one call
(``varlen_attention``) covers the whole batch; the torch path (``sdpa_packed_attention``, also the kernel's test
oracle) stacks sequences of equal length into one ``scaled_dot_product_attention`` call each, so a length-sorted batch
needs a few calls per layer.

``PackedAttention`` also satisfies the paged ``AttentionBackend`` protocol (the caches are ignored), so the
Llama-family model code runs encoder-style passes for decoder embedding models unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def equal_length_groups(seq_lens: list[int]) -> dict[int, list[int]]:
    """length -> indices of the sequences with that length, in batch order."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(seq_lens):
        groups[n].append(i)
    return groups


def sdpa_packed_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    seq_lens: list[int],  # sum == num_tokens
    scale: float,
    causal: bool,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Each sequence's queries attend to its own keys only (causal: to keys up to their own position), with torch's
    SDPA, one call per group of equal-length sequences (any device)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    starts = [0]
    for n in seq_lens:
        starts.append(starts[-1] + n)
    assert starts[-1] == num_tokens, (starts[-1], num_tokens)
    out = torch.empty_like(q)
    for length, members in equal_length_groups(seq_lens).items():
        if members[-1] - members[0] + 1 == len(members):  # consecutive sequences: a view, no copy
            lo, hi = starts[members[0]], starts[members[-1]] + length
            idx = None
            qg, kg, vg = q[lo:hi], k[lo:hi], v[lo:hi]
        else:
            idx = torch.cat([torch.arange(starts[b], starts[b] + length) for b in members]).to(q.device)
            qg, kg, vg = q[idx], k[idx], v[idx]
        n = len(members)
        qg = qg.view(n, length, num_heads, head_dim).transpose(1, 2)  # [n, heads, L, d]
        kg = kg.view(n, length, num_kv_heads, head_dim).transpose(1, 2)
        vg = vg.view(n, length, num_kv_heads, head_dim).transpose(1, 2)
        if num_kv_heads != num_heads:
            rep = num_heads // num_kv_heads
            kg = kg.repeat_interleave(rep, dim=1)
            vg = vg.repeat_interleave(rep, dim=1)
        og = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, scale=scale)
        og = og.transpose(1, 2).reshape(n * length, num_heads, head_dim)
        if idx is None:
            out[lo:hi] = og
        else:
            out[idx] = og
    return out


@dataclass
class PackedMetadata:
    seq_lens: list[int]  # tokens of each packed sequence, in batch order


class PackedAttention:
    """Causal attention within each packed sequence, for decoder models used as encoders (no KV cache).

    ``meta`` is a ``PackedMetadata``; the cache arguments are ignored. ``ops``: the kernel family that runs it.
    """

    def __init__(self, ops) -> None:
        self.ops = ops

    def forward(self, q, k, v, k_cache, v_cache, meta, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        if softcap is not None or (window is not None and max(meta.seq_lens, default=0) > window):
            raise ValueError("embedding with a decoder that has attention softcapping or a sliding window shorter "
                             "than the text is not supported")
        return self.ops.packed_attention(q, k, v, meta.seq_lens, scale, causal=True)
