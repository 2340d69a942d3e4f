"""TPGroup: the ranks one model is split over, and the three collectives the split model needs.

Rank r of N holds 1/N of every attention layer's heads (q and KV), of every MLP's intermediate channels and of the
vocabulary (embedding rows and LM-head rows); norms and RoPE tables are whole on every rank. A layer that ends a
column split (o_proj, down_proj, the embedding lookup) sums its partial results with ``all_reduce``; the LM head's
vocabulary slices are joined with ``all_gather_last``. With N = 1 every collective is the identity and no
torch.distributed state exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None  # the torch.distributed process group (None: the default one)

    def split(self, total: int, what: str) -> int:
        """This rank's share of ``total`` units that must divide evenly (heads, channels)."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} must divide {what} ({total})")
        return total // self.size

    def pad_split(self, total: int) -> tuple[int, int]:
        """(start, per-rank size) of ``total`` rows cut into equal slices, the last one padded (the vocabulary)."""
        per = -(-total // self.size)
        return self.rank * per, per

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums ``x`` over the ranks, in place; returns it."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order along the last dimension."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            import torch.distributed as dist

            dist.broadcast(x, src, group=self.group)
        return x


SINGLE = TPGroup()
