"""StepBuffers (worker/step_inputs.py): a step's integer inputs in one persistent buffer, laid out as the attention
metadata expects, with fresh views every step and growth past the configured capacity."""

import numpy as np
import torch

from tokenmill import SamplingParams
from tokenmill.core.request import Request
from tokenmill.core.step import ScheduledRequest
from tokenmill.worker.step_inputs import StepBuffers


def chunk(rid, tokens, computed, scheduled, blocks):
    r = Request(rid, tokens, SamplingParams(max_tokens=4))
    return ScheduledRequest(r, computed, scheduled, blocks)


def test_a_step_is_laid_out_in_place_and_views_are_fresh():
    bufs = StepBuffers(max_tokens=16, max_reqs=4, max_blocks=4, device=torch.device("cpu"))
    base = bufs.host.data_ptr()
    chunks = [chunk("d", list(range(10, 19)), 8, 1, [7, 3, 5]),  # a decode at position 8 (block 5 offset 0 at bs 4)
              chunk("p", [1, 2, 3, 4, 5, 6], 2, 3, [9, 2])]  # a prefill chunk of 3 of 6 tokens: does not sample
    step = bufs.fill(chunks, block_size=4)
    assert step.input_ids.tolist() == [18, 3, 4, 5]
    assert step.positions.tolist() == [8, 2, 3, 4]
    assert step.slot_mapping.tolist() == [5 * 4 + 0, 9 * 4 + 2, 9 * 4 + 3, 2 * 4 + 0]
    assert step.query_start_loc.tolist() == step.query_start_loc_list == [0, 1, 4]
    assert step.seq_lens.tolist() == step.seq_lens_list == [9, 5]
    assert step.sample_rows.tolist() == [0]
    assert step.block_tables.tolist() == [[7, 3, 5], [9, 2, 0]] and step.block_tables.is_contiguous()
    assert step.input_ids.data_ptr() == base  # on CPU the tensors are the host buffer: nothing copied
    again = bufs.fill(chunks, block_size=4)
    assert again.positions is not step.positions  # RotaryEmbedding caches by identity
    assert again.positions.data_ptr() == step.positions.data_ptr()  # the same region: no reallocation


def test_a_step_larger_than_the_capacity_grows_the_buffer():
    bufs = StepBuffers(max_tokens=2, max_reqs=1, max_blocks=1, device=torch.device("cpu"))
    chunks = [chunk(f"r{i}", list(range(1, 8)), 0, 7, [i, i + 10]) for i in range(3)]
    step = bufs.fill(chunks, block_size=4)
    assert (bufs.max_tokens, bufs.max_reqs, bufs.max_blocks) == (21, 3, 2)
    assert step.query_start_loc.tolist() == [0, 7, 14, 21]
    assert step.sample_rows.tolist() == [6, 13, 20]
    assert step.slot_mapping[7:14].tolist() == [4, 5, 6, 7, 44, 45, 46]


def reference_layout(chunks, block_size, long_rope=None):
    """The step's inputs computed chunk by chunk from first principles (the test's oracle)."""
    ids, pos, slots, qsl, seq_lens, samples = [], [], [], [0], [], []
    width = max(len(s.block_ids) for s in chunks)
    table = [list(s.block_ids) + [0] * (width - len(s.block_ids)) for s in chunks]
    for s in chunks:
        r = s.request
        for p in range(s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens):
            ids.append(r.all_token_ids[p])
            long = long_rope is not None and (p >= long_rope[0] or r.num_prompt_tokens > long_rope[0])
            pos.append(p + (long_rope[1] if long else 0))
            slots.append(s.block_ids[p // block_size] * block_size + p % block_size)
        qsl.append(len(ids))
        seq_lens.append(s.num_computed_tokens + s.num_scheduled_tokens)
        if seq_lens[-1] == r.num_tokens:
            samples.append(len(ids) - 1)
    return dict(input_ids=ids, positions=pos, slot_mapping=slots, query_start_loc=qsl, seq_lens=seq_lens,
                sample_rows=samples, block_tables=table)


def test_persistent_rows_follow_requests_through_growth_preemption_and_release():
    """A simulated run of many steps: requests gain blocks in place, some are preempted (their blocks replaced by a
    new list, shorter or longer), some finish (rows released and reused). Every step's layout equals the oracle's,
    and a released row is all zeros."""
    rng = np.random.default_rng(7)
    bs = 4
    bufs = StepBuffers(max_tokens=8, max_reqs=2, max_blocks=2, device=torch.device("cpu"), long_rope=(9, 1000))
    live = {}  # rid -> (request, its block list)
    next_block = iter(range(1, 10**6))
    for step_no in range(120):
        while len(live) < 6 or (len(live) < 12 and rng.random() < 0.3):  # admissions
            rid = f"r{step_no}-{len(live)}"
            prompt = rng.integers(1, 500, int(rng.integers(1, 14))).tolist()
            live[rid] = [Request(rid, prompt, SamplingParams(max_tokens=40)), []]
        chunks = []
        for rid, entry in sorted(live.items(), key=lambda kv: rng.random()):
            req, blocks = entry
            if req.num_computed_tokens > 0 and rng.random() < 0.05:  # preempted: recomputed from new blocks
                req.num_computed_tokens = 0
                entry[1] = blocks = []
            n = min(req.num_uncomputed_tokens, int(rng.integers(1, 6)))
            while len(blocks) * bs < req.num_computed_tokens + n:
                blocks.append(next(next_block))  # gained in place, as the KV manager does
            chunks.append(ScheduledRequest(req, req.num_computed_tokens, n, blocks))
        chunks.sort(key=lambda s: s.num_scheduled_tokens != 1)
        step = bufs.fill(chunks, block_size=bs)
        want = reference_layout(chunks, bs, bufs.long_rope)
        for name, value in want.items():
            assert getattr(step, name).tolist() == value, (step_no, name)
        finished = []
        for s in chunks:  # the step ran: computed tokens advance, the sampling ones get a token
            s.request.num_computed_tokens += s.num_scheduled_tokens
            if s.samples:
                s.request.append_output_token(int(rng.integers(1, 500)))
                if s.request.num_output_tokens >= 5 or rng.random() < 0.1:
                    finished.append(s.request)
        for req in finished:
            state = req.worker_state
            bufs.block_table.release(state)
            req.worker_state = None
            assert not bufs.block_table.table[state.row].any()
            del live[req.request_id]
    assert bufs.block_table.num_live == len(live) and bufs.block_table.table.shape[0] >= 12


def test_a_row_holds_its_blocks_then_zeros_after_a_shorter_replacement():
    bufs = StepBuffers(max_tokens=16, max_reqs=4, max_blocks=4, device=torch.device("cpu"))
    c = chunk("a", list(range(1, 14)), 0, 13, [5, 6, 7, 8])
    bufs.fill([c], block_size=4)
    row = c.request.worker_state.row
    assert bufs.block_table.table[row].tolist() == [5, 6, 7, 8]
    again = ScheduledRequest(c.request, 0, 6, [9, 10])  # preempted and readmitted: a new, shorter list
    step = bufs.fill([again], block_size=4)
    assert bufs.block_table.table[row].tolist() == [9, 10, 0, 0]
    assert step.block_tables.tolist() == [[9, 10]]
