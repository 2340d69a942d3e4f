"""Swap preemption without a model: a simulated KV cache (each slot holds the token id written there) is copied
as the scheduler's swap pairs say and checked before every chunk, so a wrong pair, a block freed too early or a step
that swaps both ways shows up as a slot holding the wrong token."""

import random

import pytest

from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.step import ModelRunnerOutput
from tokenmill.sampling_params import SamplingParams

from test_scheduler import assert_step_invariants, fake_runner_output, make_requests, make_scheduler


class SimulatedKV:
    """Device and host blocks of token ids; ``step`` applies a SchedulerOutput as the runner would."""

    def __init__(self, sched):
        self.sched = sched
        self.bs = sched.kv.block_size
        self.device: dict[int, list] = {}
        self.host: dict[int, list] = {}
        self.swap_steps = 0

    def step(self, out):
        assert not (out.blocks_to_swap_out and out.blocks_to_swap_in), "a step swaps one way only"
        for dev, host in out.blocks_to_swap_out:  # before the forward pass writes anything
            self.host[host] = list(self.device.get(dev, [None] * self.bs))
        for host, dev in out.blocks_to_swap_in:
            self.device[dev] = list(self.host[host])
        self.swap_steps += bool(out.blocks_to_swap_out or out.blocks_to_swap_in)
        for s in out.scheduled:
            tokens = s.request.all_token_ids
            for pos in range(s.num_computed_tokens):  # what attention reads
                block = self.device.get(s.block_ids[pos // self.bs])
                got = block[pos % self.bs] if block else None
                assert got == (tokens[pos], pos), f"{s.request_id} position {pos}: {got}"
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens):  # the K/V store
                block = self.device.setdefault(s.block_ids[pos // self.bs], [None] * self.bs)
                block[pos % self.bs] = (tokens[pos], pos)


def run_simulated(sched, reqs, seed=0, shared_blocks=False):
    rng = random.Random(seed)
    kv = SimulatedKV(sched)
    for r in reqs:
        sched.add_request(r)
    while sched.has_unfinished_requests():
        out = sched.schedule()
        if shared_blocks:  # prefix caching: a block may be held by several requests, counted once per holder
            held = [b for r in sched.running for b in sched.kv.block_ids(r.request_id)]
            assert sum(sched.kv.pool.ref_cnt) == len(held)
        else:
            assert_step_invariants(sched, out)
        swapped = [r for r in sched.waiting if r.status == RequestStatus.SWAPPED]
        assert all(not sched.kv.block_ids(r.request_id) for r in swapped), "a swapped request holds device blocks"
        kv.step(out)
        sched.update_from_output(out, ModelRunnerOutput(
            {s.request_id: rng.randrange(1, 100) for s in out.scheduled if s.samples}))
    return kv


@pytest.mark.parametrize("num_swap_blocks", [64, 6])  # room for every victim; room for some (the rest recompute)
@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("strategy", ["continuous", "prefill_first"])
def test_swapped_requests_resume_with_their_kv(num_swap_blocks, prefix_caching, strategy):
    """(prefill_first: a wave's last prefill preempted in the step that completes the wave keeps its swap pairs;
    they were lost while that step was scheduled again from scratch.)"""
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=32, max_num_seqs=8, prefill_chunk_size=8,
                           max_model_len=60, preemption_mode="swap", num_swap_blocks=num_swap_blocks,
                           enable_prefix_caching=prefix_caching, scheduling_strategy=strategy)
    sched.kv.enable_caching = prefix_caching
    reqs = make_requests(24, seed=5, max_len=20, min_out=10, max_out=30)
    if prefix_caching:  # shared heads, so swapped blocks are sometimes shared blocks too
        for i, r in enumerate(reqs):
            r.prompt_token_ids[:8] = r.all_token_ids[:8] = [50 + i % 3] * 8
    kv = run_simulated(sched, reqs, shared_blocks=prefix_caching)
    st = sched.stats
    assert st.num_swap_outs > 0 and kv.swap_steps > 0
    if num_swap_blocks == 6:
        assert st.num_preemptions > st.num_swap_outs, "a small swap space recomputes the victims it cannot hold"
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.max_tokens
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    assert sched.kv.swap_pool.num_free_blocks == num_swap_blocks, "every host block given back"
    assert sched.kv.num_records == 0, "nothing of a finished request is left in the KV manager"


def test_a_swapped_request_keeps_its_computed_tokens_and_an_abort_frees_its_host_blocks():
    sched = make_scheduler(num_blocks=7, block_size=4, preemption_mode="swap", max_num_batched_tokens=64,
                           max_model_len=28, num_swap_blocks=8)
    a = Request("a", [1] * 8, SamplingParams(max_tokens=20, ignore_eos=True))
    b = Request("b", [2] * 8, SamplingParams(max_tokens=20, ignore_eos=True))
    sched.add_request(a)
    sched.add_request(b)
    kv = SimulatedKV(sched)
    while b.status != RequestStatus.SWAPPED:
        out = sched.schedule()
        kv.step(out)
        sched.update_from_output(out, fake_runner_output(out))
    assert b.num_computed_tokens > 8 and b.num_output_tokens > 0  # its K/V kept, not to be recomputed
    assert sched.kv.swap_pool.num_free_blocks < 8
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert sched.kv.swap_pool.num_free_blocks == 8 and not sched.kv.block_ids("b")
    while sched.has_unfinished_requests():
        out = sched.schedule()
        kv.step(out)
        sched.update_from_output(out, fake_runner_output(out))
    assert a.output_token_ids == [7] * 20


def test_swap_needs_swap_space():
    from tokenmill.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="swap_space"):
        EngineConfig.from_dict({"preemption_mode": "swap", "swap_space": 0})
    with pytest.raises(ConfigError, match="swap_space"):
        EngineConfig.from_dict({"swap_space": -1})


def test_a_step_never_swaps_both_ways():
    """A victim in a step that swaps in is recomputed, and a swapped-out request waits out a step that swaps out:
    a device block one direction frees could be the block the other fills."""
    from tokenmill.core.scheduler import _Step

    sched = make_scheduler(num_blocks=16, preemption_mode="swap", num_swap_blocks=8)
    a = Request("a", [1] * 8, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add_request(a)
    out = sched.schedule()
    sched.update_from_output(out, fake_runner_output(out))
    step = _Step(64, 64, swap_in={"other": [(0, 9)]})
    sched._preempt(a, step)
    assert a.status == RequestStatus.PREEMPTED and a.num_computed_tokens == 0 and not step.swap_out
    b = Request("b", [2] * 8, SamplingParams(max_tokens=4, ignore_eos=True))
    sched.add_request(b)
    out = sched.schedule()
    sched.update_from_output(out, fake_runner_output(out))
    running = next(r for r in sched.running if r.request_id == "b")
    step = _Step(64, 64)
    sched._preempt(running, step)
    assert b.status == RequestStatus.SWAPPED and step.swap_out
    assert not sched._swap_in(step, b, 0) and b.status == RequestStatus.SWAPPED
    assert sched._swap_in(_Step(64, 64), b, 0) and b.status == RequestStatus.RUNNING
