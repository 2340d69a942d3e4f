"""The MoE layer's pieces (model/moe.py): routing, grouping by expert, and the C++ experts loop against the Python
one."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model.moe import group_by_expert, route


def test_route_takes_the_top_k_of_the_softmax_and_renormalises_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 3.0, 1.0]])
    probs = torch.softmax(logits, dim=-1)
    w, ids = route(logits, 2, renormalize=False)
    assert ids.tolist() == [[0, 1], [2, 3]]
    torch.testing.assert_close(w, probs.gather(1, ids))
    w, _ = route(logits, 2, renormalize=True)
    torch.testing.assert_close(w.sum(dim=-1), torch.ones(2))


def test_grouping_keeps_each_experts_pairs_contiguous_and_in_token_order():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(40)])  # [40 tokens, top 2]
    order, counts = group_by_expert(ids, 6)
    assert sum(counts) == 80 and len(counts) == 6
    flat = ids.reshape(-1)[order]
    start = 0
    for e, c in enumerate(counts):
        run = order[start:start + c]
        assert (flat[start:start + c] == e).all() and (run[1:] > run[:-1]).all()  # one expert, token order
        start += c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False])
def test_cpp_experts_loop_equals_the_python_one(kernels, dtype, packed):
    """moe_experts runs the same GEMMs (prepacked oneDNN or plain) and the same SiLU-and-mul as each expert's MLP:
    bit-equal results, an expert with no tokens included."""
    from tokenmill.model.layers import MLP, Build
    from tokenmill.model.weights import init_dummy_weights
    from tokenmill.ops.cpu_ops import CpuOps

    build = Build(CpuOps(kernels), dtype)
    experts = [MLP(64, 96, build) for _ in range(4)]
    for i, e in enumerate(experts):
        init_dummy_weights(e, seed=i)
        for lin in (e.gate_up_proj, e.down_proj):
            lin.use_gemm_backend("onednn" if packed else "aten")
    counts = [5, 0, 17, 1]
    xs = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = kernels.moe_experts(xs, counts, [e.gate_up_proj.weight for e in experts],
                              [e.down_proj.weight for e in experts])
    ref = torch.cat([e.partial(x) for e, x in zip(experts, xs.split(counts)) if x.shape[0]])
    assert torch.equal(got, ref)
