"""KVCacheManager: the only door to the block pool. Maps each request to the block ids holding its K/V.

Invariant: a request's blocks cover at least the token slots it has been granted: ``len(block_ids) * block_size >=``
the largest ``num_tokens`` passed to ``allocate_slots`` for it. Token ``i`` of a request lives in slot
``block_ids[i // block_size] * block_size + i % block_size``.
"""

from __future__ import annotations

from tokenmill.core.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def allocate_slots(self, request_id: str, num_tokens: int) -> bool:
        """Makes the request's blocks cover ``num_tokens`` token slots in all.

        Returns False, allocating nothing, when the pool has too few free blocks.
        """
        held = self._blocks.setdefault(request_id, [])
        extra = self.blocks_needed(num_tokens) - len(held)
        if extra <= 0:
            return True
        if extra > self.pool.num_free_blocks:
            if not held:
                del self._blocks[request_id]
            return False
        held.extend(self.pool.allocate(extra))
        return True

    def free(self, request_id: str) -> None:
        """Gives all of a request's blocks back to the pool (no-op if it holds none)."""
        blocks = self._blocks.pop(request_id, None)
        if blocks:
            self.pool.free(blocks)

    def block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def num_held_blocks(self) -> int:
        return sum(len(b) for b in self._blocks.values())
