"""KVCacheManager: the only door to the block pool. Maps each request to the block ids holding its K/V, and (with
``enable_caching``) shares full blocks between requests whose tokens start the same way (automatic prefix caching).

Invariant: a request's blocks cover at least the token slots it has been granted: ``len(block_ids) * block_size >=``
the largest ``num_tokens`` passed to ``allocate_slots`` for it. Token ``i`` of a request lives in slot
``block_ids[i // block_size] * block_size + i % block_size``.

Prefix caching: block ``i`` of a request is identified by a hash chained from block ``i - 1``'s hash and block
``i``'s token ids (``block_hash``); a request's ``salt`` (its LoRA adapter) keys its first block. A full block
whose K/V has been computed is registered under its hash (``cache_full_blocks``); a new request's leading blocks
found in the cache are shared (reference counted) instead of computed (``lookup`` + ``allocate_slots(hits=...)``):
a head start on ``num_computed_tokens``. The last known token of a request is never a hit (its logits are needed).
Cached blocks outlive their requests as free blocks, evicted least recently freed first (``BlockPool``).

Blocks being computed: the prompt blocks a request was admitted without (not hits) are ``pending`` until computed
and cached. ``next_block_pending`` tells the scheduler that a waiting request's next block is one of them, so it can
wait a step for a hit instead of computing the same block a second time in parallel.

Swap space (``preemption_mode="swap"``): a second, smaller pool of blocks in host memory. ``swap_out`` moves a
preempted request's computed blocks there (the pairs tell the runner what to copy; its device blocks are freed at
once, so the runner copies them out before the step's forward pass writes anything), ``swap_in`` gives it device
blocks again and frees its host ones. A request is either in device blocks or in host blocks, never in both.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from tokenmill.core.block_pool import BlockPool


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: Hashable | None, token_ids: Sequence[int], extra: Hashable | None = None) -> int:
    """``extra``: what else decides the block's K/V (a request's LoRA adapter, on its first block)."""
    return hash((parent, tuple(token_ids), extra))


@dataclass
class _RequestKV:
    """Everything the manager holds for one request, in one record (freed as one: nothing of a finished request can
    linger in a dict of its own)."""

    blocks: list[int] | None = None  # device blocks, in order; None: it holds none (not admitted, or swapped out)
    hashes: list[int] = field(default_factory=list)  # hashes of its full blocks, computed so far (lookup, caching)
    num_cached: int = 0  # how many of its leading blocks are registered in the cache
    pending: list[int] | None = None  # [first, end) indexes of its blocks still pending (being computed)
    swapped: list[int] | None = None  # its host blocks, in order, while swapped out


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False,
                 num_swap_blocks: int = 0) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks)
        self.swap_pool = BlockPool(num_swap_blocks) if num_swap_blocks > 0 else None
        self._requests: dict[str, _RequestKV] = {}
        self._pending: dict[int, int] = {}  # block hash -> how many requests are computing that block now

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _record(self, request_id: str) -> _RequestKV:
        rec = self._requests.get(request_id)
        if rec is None:
            rec = self._requests[request_id] = _RequestKV()
        return rec

    def _hashes_upto(self, request_id: str, token_ids: Sequence[int], num_blocks: int,
                     salt: Hashable | None = None) -> list[int]:
        """``salt`` (a LoRA adapter's name) keys the first block, so requests of different adapters, whose K/V
        differ for the same tokens, never share a block."""
        hashes = self._record(request_id).hashes
        bs = self.block_size
        for i in range(len(hashes), num_blocks):
            first = not hashes  # the salt keys the first block; the others chain from it
            hashes.append(block_hash(None if first else hashes[-1], token_ids[i * bs:(i + 1) * bs],
                                     salt if first else None))
        return hashes

    def lookup(self, request_id: str, token_ids: Sequence[int], salt: Hashable | None = None) -> list[int]:
        """The cached blocks that hold the request's leading tokens (all but its last token at most), in order."""
        if not self.enable_caching:
            return []
        max_blocks = (len(token_ids) - 1) // self.block_size
        hits: list[int] = []
        for h in self._hashes_upto(request_id, token_ids, max_blocks, salt):
            b = self.pool.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def allocate_slots(self, request_id: str, num_tokens: int, hits: Sequence[int] = (), keep_free: int = 0) -> bool:
        """Makes the request's blocks cover ``num_tokens`` token slots in all; ``hits`` (from ``lookup``, for a
        request that holds no blocks yet) are shared as its first blocks.

        Returns False, allocating and sharing nothing, when the pool has too few free blocks, or would keep fewer
        than ``keep_free`` free after it (a batch row leaving the online headroom).
        """
        rec = self._requests.get(request_id)
        held = rec.blocks if rec is not None else None
        if held is None:
            needed = self.blocks_needed(num_tokens) - len(hits)
            # hits that are free count against the free blocks: sharing them takes them off the free queue
            if needed + keep_free > self.pool.num_free_blocks - self.pool.free_cached_hits(list(hits)):
                return False
            self.pool.touch(list(hits))
            rec = self._record(request_id)
            rec.blocks = list(hits) + self.pool.allocate(max(0, needed))
            hashes = rec.hashes  # the prompt's full blocks, from lookup() (if it ran)
            if self.enable_caching and len(hashes) > len(hits):
                rec.pending = [len(hits), len(hashes)]
                for h in hashes[len(hits):]:
                    self._pending[h] = self._pending.get(h, 0) + 1
            return True
        extra = self.blocks_needed(num_tokens) - len(held)
        if extra <= 0:
            return True
        if extra + keep_free > self.pool.num_free_blocks:
            return False
        held.extend(self.pool.allocate(extra))
        return True

    def cache_full_blocks(self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int,
                          salt: Hashable | None = None) -> None:
        """Registers the request's blocks that are full and computed (``num_computed_tokens`` of ``token_ids``);
        ``salt`` as for ``lookup``."""
        if not self.enable_caching:
            return
        rec = self._requests.get(request_id)
        blocks = rec.blocks if rec is not None else None
        if not blocks:
            return
        full = min(num_computed_tokens // self.block_size, len(blocks))
        start = rec.num_cached
        if full <= start:
            return
        hashes = self._hashes_upto(request_id, token_ids, full, salt)
        for i in range(start, full):
            self.pool.cache(blocks[i], hashes[i])
        rec.num_cached = full
        pending = rec.pending
        if pending is not None and pending[0] < min(full, pending[1]):
            self._unpend(hashes[pending[0]:min(full, pending[1])])
            pending[0] = min(full, pending[1])

    def _unpend(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            if self._pending[h] == 1:
                del self._pending[h]
            else:
                self._pending[h] -= 1

    def next_block_pending(self, request_id: str, num_hits: int) -> bool:
        """Whether the block after a waiting request's ``num_hits`` cached blocks is being computed by a running
        request (``lookup`` first): it will be a hit once that request's chunk is done."""
        rec = self._requests.get(request_id)
        hashes = rec.hashes if rec is not None else ()
        return num_hits < len(hashes) and hashes[num_hits] in self._pending

    def free(self, request_id: str) -> None:
        """Gives a request's blocks back, tail first (no-op if it holds none); cached ones stay hittable. A swapped-out
        request's host blocks go back too. Its record goes."""
        rec = self._requests.pop(request_id, None)
        if rec is None:
            return
        if rec.swapped:
            self.swap_pool.free(rec.swapped[::-1])
        if rec.pending is not None:
            self._unpend(rec.hashes[rec.pending[0]:rec.pending[1]])
        if rec.blocks:
            self.pool.free(rec.blocks[::-1])

    def swap_out(self, request_id: str, num_computed_tokens: int) -> list[tuple[int, int]] | None:
        """Moves the blocks holding a request's first ``num_computed_tokens`` tokens to host blocks and frees all its
        device blocks. Returns the (device block, host block) pairs to copy, or None, changing nothing, when there is
        no swap space, nothing to keep, or too few free host blocks (the caller recomputes instead)."""
        n = self.blocks_needed(num_computed_tokens)
        if self.swap_pool is None or n == 0 or n > self.swap_pool.num_free_blocks:
            return None
        device = self._requests[request_id].blocks[:n]
        self.free(request_id)
        host = self.swap_pool.allocate(n)
        self._requests[request_id] = _RequestKV(swapped=host)
        return list(zip(device, host))

    def swap_in(self, request_id: str, num_tokens: int, keep_free: int = 0) -> list[tuple[int, int]] | None:
        """Gives a swapped-out request device blocks for ``num_tokens`` slots (its swapped tokens and the chunk it is
        about to run) and frees its host blocks. Returns the (host block, device block) pairs to copy, or None,
        changing nothing, when too few device blocks are free (``keep_free`` as in ``allocate_slots``)."""
        rec = self._requests[request_id]
        host, rec.swapped = rec.swapped, None
        if not self.allocate_slots(request_id, max(num_tokens, len(host) * self.block_size), keep_free=keep_free):
            rec.swapped = host
            return None
        self.swap_pool.free(host[::-1])
        return list(zip(host, rec.blocks))

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block (only while no request holds blocks)."""
        if any(r.blocks is not None for r in self._requests.values()):
            raise RuntimeError("reset_prefix_cache() while requests hold blocks")
        self.pool = BlockPool(self.pool.num_blocks)

    def block_ids(self, request_id: str) -> list[int]:
        rec = self._requests.get(request_id)
        return rec.blocks if rec is not None and rec.blocks is not None else []

    def num_held_blocks(self) -> int:
        return sum(len(r.blocks) for r in self._requests.values() if r.blocks)

    @property
    def num_records(self) -> int:
        """Requests the manager holds anything for (a test's leak check: 0 once every request is freed)."""
        return len(self._requests)
