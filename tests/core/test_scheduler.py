"""Scheduler and block pool without a model: the runner output is made by hand, as in vLLM's scheduler tests."""

import random

import pytest

from tokenmill.config import EngineConfig
from tokenmill.core.block_pool import BlockPool
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.step import ModelRunnerOutput
from tokenmill.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks=64, block_size=4, max_model_len=128, num_swap_blocks=16, **kw):
    cfg = EngineConfig.from_dict({"block_size": block_size, **kw}).resolve(max_model_len)
    swap = num_swap_blocks if cfg.preemption_mode == "swap" else 0
    return Scheduler(cfg, KVCacheManager(num_blocks, block_size, num_swap_blocks=swap))


def make_requests(n, seed=0, min_len=1, max_len=40, min_out=1, max_out=20, ignore_eos=True):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(1, 100) for _ in range(rng.randint(min_len, max_len))]
        sp = SamplingParams(max_tokens=rng.randint(min_out, max_out), temperature=0, ignore_eos=ignore_eos)
        reqs.append(Request(f"r{i}", prompt, sp, eos_token_ids=frozenset({EOS})))
    return reqs


def fake_runner_output(out, token_for=lambda req: 7):
    """Samples token_for(request) for every chunk that reaches its request's end."""
    return ModelRunnerOutput({s.request_id: token_for(s.request) for s in out.scheduled if s.samples})


def run_to_completion(sched, reqs, token_for=lambda req: 7, check=None, max_steps=100_000):
    for r in reqs:
        sched.add_request(r)
    steps = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        if check:
            check(sched, out)
        steps.append(out)
        sched.update_from_output(out, fake_runner_output(out, token_for))
    else:
        raise AssertionError("did not finish")
    return steps


def is_decode(s):
    """A decode: the request has sampled before and only its last token is new."""
    return s.request.num_output_tokens > 0 and s.num_computed_tokens + 1 == s.request.num_tokens


def assert_step_invariants(sched, out):
    cfg = sched.config
    assert out.total_num_scheduled_tokens == sum(s.num_scheduled_tokens for s in out.scheduled)
    assert 0 < out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    for s in out.scheduled:
        # blocks cover every slot the chunk writes
        assert len(s.block_ids) * cfg.block_size >= s.num_computed_tokens + s.num_scheduled_tokens
        if cfg.enable_chunked_prefill and s.num_computed_tokens < s.request.num_prompt_tokens:
            assert s.num_scheduled_tokens <= cfg.chunk_limit
    # decodes of running requests come before any prefill chunk (a swapped-out request resumes at admission)
    swapped_in = {d for _, d in out.blocks_to_swap_in}
    kinds = [is_decode(s) for s in out.scheduled if not swapped_in & set(s.block_ids)]
    first_prefill = kinds.index(False) if False in kinds else len(kinds)
    assert all(not k for k in kinds[first_prefill:]) or cfg.scheduling_strategy == "prefill_first"
    # block accounting: free + held == total, no block held twice
    held = [b for r in sched.running for b in sched.kv.block_ids(r.request_id)]
    assert len(held) == len(set(held))
    assert sched.kv.num_free_blocks + len(held) == sched.kv.num_blocks


@pytest.mark.parametrize("preemption_mode", ["none", "recompute", "swap"])
@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("strategy", ["continuous", "prefill_first"])
def test_every_request_finishes_within_budgets_without_leaks(preemption_mode, chunked, strategy):
    sched = make_scheduler(
        num_blocks=40,
        max_num_batched_tokens=128,
        max_num_seqs=6,
        prefill_chunk_size=16,
        enable_chunked_prefill=chunked,
        preemption_mode=preemption_mode,
        scheduling_strategy=strategy,
    )
    reqs = make_requests(30, seed=1)
    run_to_completion(sched, reqs, check=assert_step_invariants)
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.num_output_tokens == r.max_tokens
        assert r.output_token_ids == [7] * r.max_tokens
    assert sched.kv.num_free_blocks == sched.kv.num_blocks  # pool full again
    assert sched.kv.num_held_blocks() == 0
    if preemption_mode == "none":
        assert sched.stats.num_preemptions == 0


def test_none_never_preempts_under_memory_pressure_but_recompute_does():
    # 12 blocks of 4 tokens = 48 slots; requests need up to 60 tokens together many times over.
    kw = dict(num_blocks=16, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=60)
    none = make_scheduler(preemption_mode="none", **kw)
    rec = make_scheduler(preemption_mode="recompute", **kw)
    reqs_none = make_requests(20, seed=2, max_len=20, min_out=10, max_out=30)
    reqs_rec = make_requests(20, seed=2, max_len=20, min_out=10, max_out=30)
    running_counts = []
    run_to_completion(none, reqs_none, check=lambda s, o: running_counts.append(len(s.running)))
    run_to_completion(rec, reqs_rec, check=assert_step_invariants)
    assert none.stats.num_preemptions == 0
    assert all(r.num_preemptions == 0 for r in reqs_none)
    assert rec.stats.num_preemptions > 0
    for a, b in zip(reqs_none, reqs_rec):  # recompute still finishes every request with all its tokens
        assert a.output_token_ids == b.output_token_ids
        assert b.status == RequestStatus.FINISHED_LENGTH
    assert rec.kv.num_free_blocks == rec.kv.num_blocks


def test_none_admits_only_with_blocks_for_prompt_plus_max_tokens():
    sched = make_scheduler(num_blocks=10, block_size=4, preemption_mode="none", max_num_batched_tokens=64)
    # each needs ceil((8 + 12) / 4) = 5 blocks: two fit, the third waits
    reqs = [Request(f"r{i}", [1] * 8, SamplingParams(max_tokens=12, ignore_eos=True)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    out = sched.schedule()
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]
    assert sched.kv.num_free_blocks == 0
    assert [r.request_id for r in sched.waiting] == ["r2"]


def test_recompute_preempts_most_recently_admitted_and_keeps_its_outputs():
    sched = make_scheduler(
        num_blocks=7, block_size=4, preemption_mode="recompute", max_num_batched_tokens=64, max_model_len=28
    )
    a = Request("a", [1] * 8, SamplingParams(max_tokens=20, ignore_eos=True))
    b = Request("b", [1] * 8, SamplingParams(max_tokens=20, ignore_eos=True))
    sched.add_request(a)
    sched.add_request(b)
    preempted = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        preempted += out.preempted_request_ids
        if preempted and b.status == RequestStatus.PREEMPTED:
            assert b.num_computed_tokens == 0 and b.num_output_tokens > 0  # outputs kept, KV dropped
        sched.update_from_output(out, fake_runner_output(out))
    assert preempted and preempted[0] == "b"
    assert a.num_preemptions == 0 and b.num_preemptions >= 1
    assert a.output_token_ids == [7] * 20 and b.output_token_ids == [7] * 20


def test_fifo_admission_and_decodes_first():
    sched = make_scheduler(num_blocks=200, max_num_batched_tokens=32, max_num_seqs=4, prefill_chunk_size=8)
    reqs = make_requests(12, seed=3, min_len=10, max_len=30, min_out=5, max_out=10)
    admitted = []

    def check(s, out):
        assert_step_invariants(s, out)
        for sc in out.scheduled:
            if sc.num_computed_tokens == 0 and sc.request.request_id not in admitted:
                admitted.append(sc.request.request_id)

    run_to_completion(sched, reqs, check=check)
    assert admitted == [r.request_id for r in reqs]


def test_chunked_prefill_splits_and_disabled_schedules_whole_prompts():
    chunked = make_scheduler(max_num_batched_tokens=64, prefill_chunk_size=7)
    req = Request("long", list(range(1, 31)), SamplingParams(max_tokens=2, ignore_eos=True))
    steps = run_to_completion(chunked, [req])
    prefill = [s.scheduled[0].num_scheduled_tokens for s in steps if s.scheduled[0].num_computed_tokens < 30]
    assert prefill == [7, 7, 7, 7, 2]

    whole = make_scheduler(max_num_batched_tokens=128, enable_chunked_prefill=False)
    req = Request("long", list(range(1, 31)), SamplingParams(max_tokens=2, ignore_eos=True))
    steps = run_to_completion(whole, [req])
    assert steps[0].scheduled[0].num_scheduled_tokens == 30


def test_chunked_prefill_off_needs_budget_for_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig.from_dict({"enable_chunked_prefill": False, "max_num_batched_tokens": 64}).resolve(128)


def test_prefill_first_never_mixes_prefill_and_decode():
    sched = make_scheduler(
        num_blocks=200, max_num_batched_tokens=32, max_num_seqs=5, scheduling_strategy="prefill_first"
    )
    reqs = make_requests(15, seed=4, min_len=5, max_len=30, min_out=3, max_out=12)

    def check(s, out):
        assert_step_invariants(s, out)
        kinds = {is_decode(sc) for sc in out.scheduled}
        assert len(kinds) == 1, "a prefill_first step mixed prefill and decode"

    run_to_completion(sched, reqs, check=check)
    assert all(r.num_output_tokens == r.max_tokens for r in reqs)


def test_stop_token_and_eos_finish_and_free_blocks_in_the_same_step():
    sched = make_scheduler()
    eos_req = Request("e", [5, 6, 7], SamplingParams(max_tokens=10), eos_token_ids=frozenset({EOS}))
    stop_req = Request("s", [5, 6, 7], SamplingParams(max_tokens=10, stop_token_ids=[42]))
    ignore = Request("i", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=frozenset({EOS}))
    for r in (eos_req, stop_req, ignore):
        sched.add_request(r)
    out = sched.schedule()
    tokens = {"e": EOS, "s": 42, "i": EOS}
    finished = sched.update_from_output(out, ModelRunnerOutput({s.request_id: tokens[s.request_id] for s in out.scheduled}))
    assert {r.request_id for r in finished} == {"e", "s"}
    assert eos_req.finish_reason.value == "stop" and stop_req.stop_reason == 42
    assert sched.kv.block_ids("e") == [] and sched.kv.block_ids("s") == []
    assert len(sched.running) == 1
    run_to_completion(sched, [], token_for=lambda r: EOS)
    assert ignore.num_output_tokens == 3 and ignore.finish_reason.value == "length"


def test_max_model_len_ends_a_request():
    sched = make_scheduler(max_model_len=12)
    req = Request("r", [1] * 8, SamplingParams(max_tokens=100, ignore_eos=True))
    run_to_completion(sched, [req])
    assert req.num_tokens == 12 and req.finish_reason.value == "length"


def test_abort_frees_blocks():
    sched = make_scheduler()
    reqs = make_requests(3, seed=5)
    for r in reqs:
        sched.add_request(r)
    sched.schedule()
    sched.finish_requests(["r0", "r1", "r2"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


def test_block_pool_rejects_double_free_and_over_allocation():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError):
        pool.free(blocks[:1])
    assert pool.num_free_blocks == 4


def test_kv_cache_manager_allocates_nothing_when_short():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots("a", 8)
    assert not kv.allocate_slots("b", 8)
    assert kv.block_ids("b") == [] and kv.num_free_blocks == 1
    assert kv.allocate_slots("a", 12) and kv.num_free_blocks == 0
    kv.free("a")
    assert kv.num_free_blocks == 3


def test_unknown_engine_option_is_named():
    with pytest.raises(ValueError, match="max_num_seq\\b"):
        EngineConfig.from_dict({"max_num_seq": 4})
    with pytest.raises(ValueError, match="preemption_mode"):
        EngineConfig.from_dict({"preemption_mode": "evict"})


def test_sampling_params_name_every_bad_field():
    with pytest.raises(ValueError) as e:
        SamplingParams(max_tokens=0, temperature=-1, top_p=0)
    msg = str(e.value)
    assert "max_tokens" in msg and "temperature" in msg and "top_p" in msg
