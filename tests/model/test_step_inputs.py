"""StepBuffers (worker/step_inputs.py): a step's integer inputs in one persistent buffer, laid out as the attention
metadata expects, with fresh views every step and growth past the configured capacity."""

import torch

from tokenmill import SamplingParams
from tokenmill.core.request import Request
from tokenmill.core.scheduler import ScheduledRequest
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
