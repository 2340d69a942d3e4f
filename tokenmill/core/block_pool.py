"""BlockPool: the fixed set of KV cache blocks, their reference counts, the free queues and the prefix cache.

Invariants:
- every block id in [0, num_blocks) is either free (``ref_cnt == 0``, in exactly one of the two free queues) or in
  use (``ref_cnt >= 1``, in no free queue); ``num_free_blocks + in use == num_blocks``;
- a block with a hash is in ``cached`` under that hash (at most one block per hash), in use or free; a free block
  with a hash is a cache entry that can still be hit, and is evicted (its hash dropped) only when it is handed out.

Free blocks without a hash are handed out first, the most recently freed first: the set of blocks a long job ever
touches stays as small as its peak concurrency needs (the KV cache is allocated lazily, page by page) and reused
blocks are still warm. Then cached free blocks are evicted least recently freed first; a request's blocks are freed
tail first, so its last blocks go before the head it may share with others.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))  # free, no hash: LIFO
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # free, hashed: least recently freed first
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Hashable | None] = [None] * num_blocks
        self.cached: dict[Hashable, int] = {}  # hash -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + len(self._free_cached)

    def allocate(self, n: int) -> list[int]:
        """Takes n free blocks (uncached ones first, then evicts cached ones, oldest first); raises if fewer are
        free (callers check first)."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} blocks with only {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._free_cached.popitem(last=False)
                del self.cached[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """One more user of each (cached) block: a prefix hit; a free one leaves the free queue."""
        for b in block_ids:
            if self.ref_cnt[b] == 0:
                del self._free_cached[b]
            self.ref_cnt[b] += 1

    def free(self, block_ids: list[int]) -> None:
        """One user fewer of each block, in the order given (callers pass a request's blocks tail first)."""
        for b in block_ids:
            if self.ref_cnt[b] <= 0:
                raise RuntimeError(f"block {b} freed twice")
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is not None:
                    self._free_cached[b] = None
                else:
                    self._free.appendleft(b)

    def lookup(self, block_hash: Hashable) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block: int, block_hash: Hashable) -> None:
        """Registers a full, in-use block under its hash (a block whose content another block already caches
        stays uncached: the first one is kept)."""
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block

    def free_cached_hits(self, block_ids: list[int]) -> int:
        """How many of these blocks are free now (touching them takes them off the free count)."""
        return sum(1 for b in block_ids if self.ref_cnt[b] == 0)
