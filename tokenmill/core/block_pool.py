"""BlockPool: the fixed set of KV cache blocks and the free queue.

Invariant: every block id in [0, num_blocks) is either in the free queue or held by exactly one owner;
``num_free_blocks + held == num_blocks``. The most recently freed block is handed out first: the set of blocks a
long job ever touches stays as small as its peak concurrency needs (the KV cache is allocated lazily, page by page,
so this keeps resident memory flat however long the job runs) and reused blocks are still warm in cache.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Takes n blocks from the free queue; raises if fewer are free (callers check first)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} blocks with only {len(self._free)} free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._is_free[b] = False
        return out

    def free(self, block_ids: list[int]) -> None:
        for b in block_ids:
            if self._is_free[b]:
                raise RuntimeError(f"block {b} freed twice")
            self._is_free[b] = True
            self._free.appendleft(b)
