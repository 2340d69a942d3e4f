"""Priority classes in the scheduler (core/priority.py): online requests first, batch rows in what they leave."""

import random

import pytest

from tests.core.test_scheduler import assert_step_invariants, fake_runner_output, make_scheduler
from tokenmill.core.priority import BATCH, ONLINE, OnlineHeadroom
from tokenmill.core.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams


def req(rid, prompt_len, max_tokens, priority):
    return Request(rid, [1 + i % 50 for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens,
                                                                                ignore_eos=True), priority=priority)


def step(sched):
    out = sched.schedule()
    assert_step_invariants(sched, out)
    sched.update_from_output(out, fake_runner_output(out))
    return out


def test_online_requests_are_admitted_before_batch_rows_that_came_first():
    sched = make_scheduler(num_blocks=200, max_num_seqs=8, max_num_batched_tokens=512, batch_token_budget=512)
    for i in range(10):
        sched.add_request(req(f"b{i}", 8, 4, BATCH))
    sched.add_request(req("o0", 8, 4, ONLINE))
    sched.add_request(req("o1", 8, 4, ONLINE))
    out = sched.schedule()
    ids = [s.request_id for s in out.scheduled]
    assert ids[:2] == ["o0", "o1"]
    assert all(i.startswith("b") for i in ids[2:])
    # the headroom is active now: batch rows leave max_num_seqs // 4 = 2 sequence slots open
    assert len(ids) == 8 - sched.headroom.seqs


def test_batch_rows_leave_the_online_headroom_free_and_an_online_burst_fits_at_once():
    # 64 blocks of 4 tokens; each request reserves (16 + 16) / 4 = 8 blocks; before any online request the
    # headroom is one max_model_len request (128 / 4 = 32 blocks), capped at half the pool (32)
    sched = make_scheduler(num_blocks=64, block_size=4, max_model_len=128, max_num_seqs=16,
                           max_num_batched_tokens=1024)
    assert sched.headroom.blocks == 32
    for i in range(20):
        sched.add_request(req(f"b{i}", 16, 16, BATCH))
    step(sched)
    assert len(sched.running) == 4  # 4 x 8 = 32 blocks taken, 32 left for online load
    assert sched.kv.num_free_blocks == 32
    for i in range(4):
        sched.add_request(req(f"o{i}", 16, 16, ONLINE))
    out = step(sched)
    admitted = {s.request_id for s in out.scheduled if s.num_computed_tokens == 0}
    assert admitted == {"o0", "o1", "o2", "o3"}  # the whole burst, at once, with nothing preempted
    assert sched.stats.num_preemptions == 0


def test_with_nothing_running_a_batch_row_takes_what_it_needs():
    # one row reserves 60 of 64 blocks, more than the pool minus the headroom: it still runs (a batch progresses)
    sched = make_scheduler(num_blocks=64, block_size=4, max_model_len=256, max_num_batched_tokens=1024)
    sched.add_request(req("big", 200, 40, BATCH))
    out = step(sched)
    assert [s.request_id for s in out.scheduled] == ["big"]


def test_an_online_request_that_does_not_fit_blocks_batch_admission():
    sched = make_scheduler(num_blocks=20, block_size=4, max_model_len=64, max_num_batched_tokens=1024)
    sched.add_request(req("o0", 30, 30, ONLINE))  # 15 blocks
    step(sched)
    sched.add_request(req("o1", 30, 30, ONLINE))  # 15 more: does not fit
    sched.add_request(req("b0", 4, 4, BATCH))  # 2 blocks would fit, but would eat into what o1 waits for
    out = step(sched)
    assert {s.request_id for s in out.scheduled} == {"o0"}
    assert [r.request_id for r in sched.waiting] == ["o1", "b0"]


def test_online_prefill_chunks_go_before_a_running_batch_prefill():
    sched = make_scheduler(num_blocks=200, block_size=4, max_model_len=256, max_num_batched_tokens=16,
                           prefill_chunk_size=16, enable_chunked_prefill=True)
    sched.add_request(req("b0", 100, 4, BATCH))
    step(sched)  # b0 takes the whole budget
    sched.add_request(req("o0", 10, 4, ONLINE))
    out = step(sched)  # o0 prefills first; beside it the batch gets an eighth of its budget (16 // 8 // 8 -> 1)
    assert [(s.request_id, s.num_scheduled_tokens) for s in out.scheduled] == [("o0", 10), ("b0", 1)]


def test_beside_online_requests_batch_rows_share_the_batch_token_budget_in_turn():
    sched = make_scheduler(num_blocks=400, block_size=4, max_model_len=256, max_num_seqs=16,
                           max_num_batched_tokens=64)  # batch_token_budget: 64 // 8 = 8
    for i in range(12):
        sched.add_request(req(f"b{i}", 4, 50, BATCH))
    out = step(sched)
    assert sum(s.num_scheduled_tokens for s in out.scheduled) == 48  # alone, a batch takes the whole budget
    step(sched)
    sched.add_request(req("o0", 30, 50, ONLINE))
    counts: dict[str, int] = {}
    for i in range(6):
        out = step(sched)
        batch = [s for s in out.scheduled if s.request.priority == BATCH]
        if i == 0:  # the online prompt whole in the step, beside an eighth of the batch's budget: 1 decode
            assert {s.request_id: s.num_scheduled_tokens for s in out.scheduled}["o0"] == 30
            assert sum(s.num_scheduled_tokens for s in batch) == 1
        assert sum(s.num_scheduled_tokens for s in batch) <= 8  # every step while o0 runs
        for s in batch:
            counts[s.request_id] = counts.get(s.request_id, 0) + 1
    assert sorted(counts) == sorted(f"b{i}" for i in range(12))  # in turn: none waits for ever
    while any(r.priority == ONLINE for r in sched.running):
        step(sched)
    out = step(sched)
    assert len(out.scheduled) == 8  # online traffic ran lately: steps stay short for the next arrival
    sched.headroom.steps_since_online = OnlineHeadroom.IDLE_STEPS  # ... until a quiet spell
    out = step(sched)
    assert len(out.scheduled) == 12  # every batch row decodes again


def test_a_full_pool_preempts_a_batch_row_before_an_online_request():
    sched = make_scheduler(num_blocks=12, block_size=4, max_model_len=48, preemption_mode="recompute",
                           max_num_batched_tokens=1024)
    online = req("o0", 8, 30, ONLINE)
    batch = req("b0", 8, 30, BATCH)
    sched.add_request(online)
    step(sched)
    sched.add_request(batch)
    for _ in range(200):
        if not sched.has_unfinished_requests():
            break
        step(sched)
    assert online.num_preemptions == 0
    assert batch.num_preemptions > 0
    assert online.status == batch.status == RequestStatus.FINISHED_LENGTH


def test_the_headroom_follows_online_load_and_shrinks_when_it_stops():
    h = OnlineHeadroom(num_blocks=1000, block_size=16, max_num_seqs=32, max_model_len=4096)
    assert not h.active and h.seqs == 2 and h.blocks == 256  # before any online request: one max_model_len's blocks
    for n in [100] * 60 + [800] * 4:
        h.observe(n)
    assert h.active and h.requests == 8
    assert h.per_request_blocks == 50  # p95 of 64 reservations: the 61st smallest, 800 tokens = 50 blocks
    assert h.blocks == 400 and h.seqs == 8
    for _ in range(OnlineHeadroom.IDLE_STEPS):
        h.tick()
    assert not h.active and h.blocks == 100 and h.seqs == 2  # a quiet spell: max_num_seqs // 16 requests


@pytest.mark.parametrize("preemption_mode", ["none", "recompute"])
def test_mixed_classes_all_finish_without_leaks(preemption_mode):
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=48, block_size=4, max_model_len=96, max_num_seqs=6,
                           max_num_batched_tokens=64, prefill_chunk_size=16, preemption_mode=preemption_mode)
    pending = [req(f"r{i}", rng.randint(1, 40), rng.randint(1, 20), rng.choice((ONLINE, BATCH))) for i in range(40)]
    reqs = list(pending)
    for _ in range(10_000):
        for _ in range(rng.randint(0, 2)):  # requests keep arriving while others run
            if pending:
                sched.add_request(pending.pop(0))
        if not sched.has_unfinished_requests():
            if not pending:
                break
            continue
        step(sched)
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.max_tokens for r in reqs)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    if preemption_mode == "none":
        assert sched.stats.num_preemptions == 0
