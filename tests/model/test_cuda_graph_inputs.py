"""The CUDA graphs' padded decode batch (worker/cuda_graphs.py), run eagerly on CPU: a decode step laid into the
static buffers of the next captured size (pad rows: slot -1, one key, zero table rows, stale ids and positions) gives
the real rows the hidden states of the plain step, and the pad rows store nothing in the cache. On CUDA the same
buffers feed the replayed graph (tests/gpu)."""

import numpy as np
import torch

from helpers import save_tiny_model
from tokenmill.attention.backend import AttentionMetadata
from tokenmill.model.loader import load_model
from tokenmill.ops import make_ops
from tokenmill.worker.cuda_graphs import DecodeGraphs


def test_a_padded_decode_batch_equals_the_plain_step(tmp_path):
    """Graphs serve the Triton family only (its K/V store skips slot -1): the kernels run interpreted here."""
    save_tiny_model("llama", tmp_path / "m")
    ops = make_ops("triton", torch.device("cpu"))
    model = load_model(str(tmp_path / "m"), "float32", "cpu", ops=ops).model
    mc, bs, num_blocks, max_blocks = model.config, 4, 40, 8
    torch.manual_seed(0)
    shape = (num_blocks, bs, mc.num_key_value_heads, mc.head_dim)
    kv = [(torch.randn(shape), torch.randn(shape)) for _ in range(mc.num_hidden_layers)]
    graphs = DecodeGraphs(model, kv, ops.attention, max_batch=16, max_blocks=max_blocks, device=torch.device("cpu"))
    graphs.input_ids.fill_(7)  # stale values a previous, bigger step left in the pad rows
    graphs.positions.fill_(30)
    graphs.slot_mapping.fill_(5)
    graphs.seq_lens.fill_(9)
    graphs.block_tables.fill_(2)
    contexts = [5, 17, 9]  # -> the size-4 batch, one pad row
    rng = np.random.default_rng(1)
    table = torch.zeros(3, 5, dtype=torch.int64)
    for i, c in enumerate(contexts):
        table[i, :-(-c // bs)] = torch.from_numpy(rng.choice(np.arange(1, num_blocks), -(-c // bs), replace=False))
    pos = torch.tensor([c - 1 for c in contexts])
    slots = table[torch.arange(3), pos // bs] * bs + pos % bs
    ids = torch.tensor([11, 12, 13])
    seq_lens = torch.tensor(contexts)
    snapshot = [(k.clone(), v.clone()) for k, v in kv]
    meta = AttentionMetadata(list(range(4)), contexts, 3, slots, table, seq_lens, torch.arange(4))
    plain = model(ids, pos, kv, meta, ops.attention)
    after_plain = [(k.clone(), v.clone()) for k, v in kv]
    for (k, v), (k0, v0) in zip(kv, snapshot):  # back to before the step
        k.copy_(k0)
        v.copy_(v0)
    padded = graphs.run(ids, pos, slots, seq_lens, table)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    for (k, v), (k1, v1) in zip(kv, after_plain):  # the same K/V written, nothing more (pad rows store nothing)
        assert torch.equal(k, k1) and torch.equal(v, v1)
    assert graphs.slot_mapping[3].item() == -1 and graphs.seq_lens[3].item() == 1
    assert not graphs.block_tables[3].any() and not graphs.block_tables[:3, 5:].any()
