"""The profiling pass's step (worker/profile.py) runs the largest step the scheduler can form on a real model: its
inputs are a valid chunked layout whatever the budget and max_model_len, and the forward over them works on every
kernel family (on CUDA the same step is what the allocator's peak is read from)."""

import pytest
import torch

from helpers import save_tiny_model
from tokenmill.config import EngineConfig
from tokenmill.model.loader import load_model
from tokenmill.ops import make_ops
from tokenmill.worker.profile import profile_inputs, profile_step


@pytest.mark.parametrize("budget,max_len,seqs", [(64, 256, 8), (100, 30, 4), (7, 256, 16)])
def test_profile_inputs_cover_the_budget_in_valid_sequences(budget, max_len, seqs):
    cfg = EngineConfig(max_num_batched_tokens=budget, max_model_len=max_len, max_num_seqs=seqs, block_size=4)
    ids, pos, meta, num_blocks = profile_inputs(cfg, torch.device("cpu"))
    assert ids.shape[0] == budget == meta.query_start_loc[-1] == sum(meta.seq_lens)
    assert max(meta.seq_lens) <= max_len - 1
    slots = meta.slot_mapping.tolist()
    assert len(set(slots)) == budget and min(slots) >= 4 and max(slots) < num_blocks * 4  # block 0 never written
    for i, n in enumerate(meta.seq_lens):
        start = meta.query_start_loc[i]
        assert pos[start:start + n].tolist() == list(range(n))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu_kernel", "triton"])
def test_the_profile_step_runs_on_each_kernel_family(tmp_path, backend):
    save_tiny_model("qwen3", tmp_path / "m")
    ops = make_ops(backend, torch.device("cpu"))
    model = load_model(str(tmp_path / "m"), "float32", "cpu", ops=ops).model
    cfg = EngineConfig(max_num_batched_tokens=40, max_model_len=17, max_num_seqs=6, block_size=4)
    logprobs, scratch = profile_step(model, cfg, torch.float32, torch.device("cpu"))
    assert logprobs.shape == (6, model.config.vocab_size) and torch.isfinite(logprobs).all()
    mc = model.config
    assert scratch == 2 * mc.num_hidden_layers * profile_inputs(cfg, torch.device("cpu"))[3] * 4 * \
        mc.num_key_value_heads * mc.head_dim * 4
