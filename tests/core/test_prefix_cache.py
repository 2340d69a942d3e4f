"""The block pool and KV cache manager with prefix caching, without a model: the hash chain, reference counts,
eviction order, the last-token rule, the free count with free hits, and no block ever both free and in use."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.block_pool import BlockPool
from tokenmill.core.kv_cache_manager import KVCacheManager, block_hash


def check_pool(pool: BlockPool) -> None:
    free = list(pool._free) + list(pool._free_cached)
    assert len(free) == len(set(free)) == pool.num_free_blocks
    for b in range(pool.num_blocks):
        assert (pool.ref_cnt[b] == 0) == (b in free), b
        if pool.block_hash[b] is not None:
            assert pool.cached[pool.block_hash[b]] == b
    assert set(pool._free_cached) <= {b for b in range(pool.num_blocks) if pool.block_hash[b] is not None}
    assert len(pool.cached) == sum(h is not None for h in pool.block_hash)


def test_hash_chain_depends_on_every_earlier_block():
    a = block_hash(None, [1, 2, 3, 4])
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(None, [1, 2, 3, 9]), [5, 6, 7, 8])
    assert block_hash(a, [5, 6, 7, 8]) == block_hash(block_hash(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    assert block_hash(a, [5, 6, 7, 8], extra="lora-1") != block_hash(a, [5, 6, 7, 8])


def test_a_shared_prefix_is_hit_reference_counted_and_kept_after_its_requests():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = list(range(10, 23))  # 13 tokens: 3 full blocks + 1
    assert kv.lookup("a", a) == [] and kv.allocate_slots("a", 13)
    kv.cache_full_blocks("a", a, 13)
    b = a[:12] + [99, 98]  # same first 3 blocks
    hits = kv.lookup("b", b)
    assert hits == kv.block_ids("a")[:3]
    assert kv.allocate_slots("b", 14, hits)
    assert [kv.pool.ref_cnt[x] for x in hits] == [2, 2, 2]
    kv.free("a")
    kv.free("b")
    check_pool(kv.pool)
    assert kv.num_free_blocks == 10 and len(kv.pool.cached) == 3
    assert kv.lookup("c", a) == hits  # kept as free cache entries: hit after both requests ended


def test_the_last_token_is_never_a_hit():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    a = list(range(8))  # exactly 2 blocks
    kv.allocate_slots("a", 8)
    kv.cache_full_blocks("a", a, 8)
    kv.free("a")
    assert len(kv.lookup("b", a)) == 1  # the second block holds the last token: computed again
    assert len(kv.lookup("c", a + [1])) == 2


def test_uncached_blocks_go_first_then_cached_ones_least_recently_freed_first_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=2, enable_caching=True)
    x = [1, 2, 3, 4, 5, 6]  # 3 blocks
    kv.allocate_slots("x", 6)
    kv.cache_full_blocks("x", x, 6)
    blocks = kv.block_ids("x")
    kv.free("x")  # tail first: blocks[2] is the oldest free cache entry
    fresh = kv.pool.allocate(3)
    assert set(fresh).isdisjoint(blocks)  # the never-cached blocks first
    assert kv.pool.allocate(1) == [blocks[2]]  # then the tail of x is evicted before its head
    assert kv.lookup("y", x + [7]) == blocks[:2]
    check_pool(kv.pool)


def test_free_hits_count_against_the_free_blocks():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    kv.allocate_slots("a", 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    kv.free("a")  # 4 free, 2 of them cache entries
    hits = kv.lookup("b", [1, 2, 3, 4, 5])
    assert len(hits) == 2
    assert not kv.allocate_slots("b", 10, hits)  # 5 blocks: 2 hits + 3 new, but only 2 others are free
    check_pool(kv.pool)
    assert kv.allocate_slots("b", 8, hits) and kv.num_free_blocks == 0
    check_pool(kv.pool)


def test_caching_off_shares_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    kv.allocate_slots("a", 4)
    kv.cache_full_blocks("a", [1, 2, 3, 4], 4)
    assert kv.lookup("b", [1, 2, 3, 4, 5]) == [] and not kv.pool.cached


OPS = st.lists(st.tuples(st.sampled_from(["add", "grow", "compute", "free"]), st.integers(0, 5), st.integers(0, 3)),
               max_size=60)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(ops=OPS)
def test_no_block_is_ever_both_free_and_in_use(ops):
    kv = KVCacheManager(num_blocks=12, block_size=2, enable_caching=True)
    heads = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 8]]
    tokens: dict[str, list[int]] = {}
    granted: dict[str, int] = {}
    for op, r, k in ops:
        rid = f"r{r}"
        if op == "add" and rid not in tokens:
            t = heads[k % 3] + [r, k] * (k + 1)
            hits = kv.lookup(rid, t)
            if kv.allocate_slots(rid, len(hits) * 2 + 1, hits):
                tokens[rid], granted[rid] = t, len(hits) * 2 + 1
            else:
                kv.free(rid)  # drops its hashes; holds no blocks
        elif op == "grow" and rid in tokens:
            want = min(len(tokens[rid]), granted[rid] + 2 * (k + 1))
            if kv.allocate_slots(rid, want):
                granted[rid] = max(granted[rid], want)
        elif op == "compute" and rid in tokens:
            kv.cache_full_blocks(rid, tokens[rid], granted[rid])
        elif op == "free" and rid in tokens:
            kv.free(rid)
            del tokens[rid], granted[rid]
        check_pool(kv.pool)
        for rid, n in granted.items():
            assert len(kv.block_ids(rid)) * 2 >= n
        in_use = [b for rid in tokens for b in kv.block_ids(rid)]
        assert all(kv.pool.ref_cnt[b] >= 1 for b in in_use)
        assert sum(kv.pool.ref_cnt) == len(in_use)
        assert sum(kv._pending.values()) == sum(r.pending[1] - r.pending[0] for r in kv._requests.values()
                                                if r.pending is not None)
        assert kv.num_records == len(tokens)  # a request refused or freed leaves no record behind
    for rid in list(tokens):
        kv.free(rid)
    assert not kv._pending and kv.num_records == 0  # nothing is left "being computed", nothing of any request


def test_a_block_being_computed_is_pending_until_cached():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = list(range(10, 23))  # 3 full blocks + 1
    kv.lookup("a", a)
    kv.allocate_slots("a", 13)
    b = a[:8] + [99, 98, 97, 96, 95]
    assert kv.lookup("b", b) == [] and kv.next_block_pending("b", 0)  # a is computing b's first block
    assert not kv.next_block_pending("c", 0)  # unknown / never looked up
    kv.cache_full_blocks("a", a, 8)  # a's first chunk: 2 blocks computed
    hits = kv.lookup("b", b)
    assert len(hits) == 2 and not kv.next_block_pending("b", 2)  # b's third block is its own
    kv.free("a")
    assert not kv._pending


def test_the_scheduler_waits_a_step_for_a_prefix_being_computed_and_lets_others_pass():
    from tokenmill.config import EngineConfig
    from tokenmill.core.request import Request
    from tokenmill.core.scheduler import Scheduler
    from tokenmill.core.step import ModelRunnerOutput
    from tokenmill.sampling_params import SamplingParams

    cfg = EngineConfig.from_dict({"block_size": 4, "max_num_batched_tokens": 256}).resolve(128)
    sched = Scheduler(cfg, KVCacheManager(64, 4, enable_caching=True))
    head = list(range(1, 25))  # 6 blocks
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    for rid, prompt in (("a", head + [50, 51]), ("b", head + [60, 61, 62]), ("c", [70 + i for i in range(9)])):
        sched.add_request(Request(rid, prompt, sp, eos_token_ids=frozenset()))
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["a", "c"]  # b waits: its head is a's prefill
    sched.update_from_output(out, ModelRunnerOutput({s.request_id: 7 for s in out.scheduled if s.samples}))
    out = sched.schedule()
    b = next(s for s in out.scheduled if s.request_id == "b")
    assert b.num_computed_tokens == 24 and b.num_scheduled_tokens == 3  # a hit on all six blocks
    assert sched.stats.prefix_cache_hits == 24


def test_blocks_allocated_without_a_lookup_are_freed_cleanly():
    kv = KVCacheManager(num_blocks=6, block_size=4, enable_caching=True)
    assert kv.allocate_slots("x", 10)  # no lookup first (LLMEngine.score does this)
    kv.cache_full_blocks("x", list(range(10)), 10)
    kv.free("x")
    assert kv.num_free_blocks == 6 and not kv._pending and kv.num_records == 0
