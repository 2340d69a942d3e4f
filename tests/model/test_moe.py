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
@pytest.mark.parametrize("backend", ["onednn", "aten", "panels"])
def test_cpp_experts_loop_equals_the_python_one(kernels, dtype, backend):
    """moe_experts runs the same GEMMs (prepacked oneDNN, plain, or the panel GEMM on AVX2-only CPUs) and the same
    SiLU-and-mul as each expert's MLP: bit-equal results, an expert with no tokens included."""
    from tokenmill.model import gemm
    from tokenmill.model.layers import MLP, Build
    from tokenmill.model.weights import init_dummy_weights
    from tokenmill.ops.cpu_ops import CpuOps

    if backend == "panels" and not gemm.panels_available():
        pytest.skip("the panels path runs on AVX2 CPUs without AVX-512")
    build = Build(CpuOps(kernels), dtype)
    experts = [MLP(64, 96, build) for _ in range(4)]
    for i, e in enumerate(experts):
        init_dummy_weights(e, seed=i)
        for lin in (e.gate_up_proj, e.down_proj):
            lin.use_gemm_backend(backend)
            assert gemm.is_panels(lin.weight) == (backend == "panels")
    counts = [5, 0, 17, 1]
    xs = torch.randn(sum(counts), 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = kernels.moe_experts(xs, counts, [e.gate_up_proj.weight for e in experts],
                              [e.down_proj.weight for e in experts])
    ref = torch.cat([e.partial(x) for e, x in zip(experts, xs.split(counts)) if x.shape[0]])
    assert torch.equal(got, ref)


@pytest.mark.parametrize("amx", [False, True])
def test_cpp_w8a8_experts_loop_equals_the_python_one(kernels, amx):
    """moe_experts_w8a8 (the rows quantized once, then each expert's int8 GEMMs and fused SiLU-and-mul
    quantization) equals each w8a8 expert's MLP run alone, bit for bit: runs of 1 to 40 rows (tile and VNNI sizes),
    an expert with no tokens, on the AMX tiles and on VNNI."""
    from tokenmill.model.layers import MLP, Build
    from tokenmill.model.weights import init_dummy_weights
    from tokenmill.ops.cpu_ops import CpuOps

    if not kernels.int8_gemm_available():
        pytest.skip("this build has no AVX512-VNNI int8_gemm (w8a8 experts loop in Python)")
    build = Build(CpuOps(kernels, amx=amx), torch.bfloat16, quantization="w8a8")
    experts = [MLP(128, 96, build) for _ in range(5)]
    g = torch.Generator().manual_seed(2)
    for i, e in enumerate(experts):
        for lin in (e.gate_up_proj, e.down_proj):
            lin.load_rows(0, torch.randn(lin.out_features, lin.in_features, generator=g) * 0.05, "w")
            lin.finalize()
        assert e.gate_up_proj.quantized.packed is not None
    counts = [5, 0, 40, 1, 17]
    xs = torch.randn(sum(counts), 128, generator=g).bfloat16()
    gu = [e.gate_up_proj.quantized for e in experts]
    down = [e.down_proj.quantized for e in experts]
    got = kernels.moe_experts_w8a8(xs, counts, [w.packed for w in gu], [w.comp for w in gu], [w.scale for w in gu],
                                   [w.packed for w in down], [w.comp for w in down], [w.scale for w in down],
                                   gu[0].amx)
    ref = torch.cat([e.partial(x) for e, x in zip(experts, xs.split(counts)) if x.shape[0]])
    assert torch.equal(got, ref)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amx", [False, True])
def test_cpp_weight_only_experts_loop_equals_the_python_one(kernels, quantization, dtype, amx):
    """moe_experts_panels (the rows converted once, then each expert's panel GEMMs and SiLU-and-mul) equals each
    int8 / int4 weight-only expert's MLP run alone, bit for bit: runs of 1 to 40 rows, an expert with no tokens, in
    float32 and bfloat16 models, on AMX tiles and without (int4's panels exist only on AMX)."""
    from tokenmill.model.layers import MLP, Build
    from tokenmill.model.moe import SparseMoE
    from tokenmill.ops.cpu_ops import CpuOps

    ops = CpuOps(kernels, amx=amx)
    if quantization == "int4" and not ops.amx:
        pytest.skip("int4 weight-only experts are in the kernels' panels only with AMX (torch's int4 kernel otherwise)")
    build = Build(ops, dtype, quantization=quantization)
    experts = [MLP(128, 96, build) for _ in range(5)]
    g = torch.Generator().manual_seed(3)
    for e in experts:
        for lin in (e.gate_up_proj, e.down_proj):
            lin.load_rows(0, torch.randn(lin.out_features, lin.in_features, generator=g) * 0.05, "w")
            lin.finalize()
    holder = SparseMoE.__new__(SparseMoE)  # only the experts and the operand cache: _panel_operands' inputs
    torch.nn.Module.__init__(holder)
    holder.experts, holder._panels = torch.nn.ModuleList(experts), None
    operands = holder._panel_operands()
    assert operands, "the experts should be in the kernels' panels"
    assert operands[-1] == (2 if quantization == "int4" else int(ops.amx))
    counts = [5, 0, 40, 1, 17]
    xs = torch.randn(sum(counts), 128, generator=g).to(dtype)
    got = kernels.moe_experts_panels(xs, counts, *operands)
    ref = torch.cat([e.partial(x) for e, x in zip(experts, xs.split(counts)) if x.shape[0]])
    assert got.dtype == dtype and torch.equal(got, ref)


def _one_call_matches_the_loop(tmp_path, monkeypatch, kernels, call: str, flag: str, dtype: str, quantization: str):
    """A tiny Mixtral's greedy tokens over a busy chunked batch with its experts in one ``call`` per MoE layer, then
    with ``flag`` off on every SparseMoE (the Python loop over the experts): equal, and the call used only the first
    time."""
    from helpers import save_tiny_model
    from tokenmill import LLM, SamplingParams
    from tokenmill.model.moe import SparseMoE

    save_tiny_model("mixtral", tmp_path / "m")
    calls = []
    real = getattr(kernels, call)
    monkeypatch.setattr(kernels, call, lambda *a: calls.append(1) or real(*a))
    llm = LLM(str(tmp_path / "m"), dtype=dtype, quantization=quantization, kv_cache_memory=0.05,
              cache_dir=str(tmp_path), max_num_batched_tokens=48)
    prompts = [[(5 * i + j) % 250 + 3 for j in range(4 + 7 * i)] for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    one_call = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert calls
    for m in llm.engine.runner.model.modules():
        if isinstance(m, SparseMoE):
            setattr(m, flag, False)
    calls.clear()
    loop = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert not calls and one_call == loop


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_weight_only_moe_model_takes_the_one_call_experts_and_keeps_its_tokens(tmp_path, monkeypatch, quantization):
    """float32 with int8 / int4 weight-only experts: one moe_experts_panels call per MoE layer where the experts are
    in the kernels' panels, the Python loop's tokens."""
    from tokenmill.kernels import cpu_kernel

    kernels = cpu_kernel.load()
    if kernels is None:
        pytest.skip("no C++ kernels: the experts loop in Python")
    if quantization == "int4" and not kernels.amx_available():
        pytest.skip("int4 weight-only experts are in the kernels' panels only with AMX")
    _one_call_matches_the_loop(tmp_path, monkeypatch, kernels, "moe_experts_panels", "panels_call", "float32",
                               quantization)


def test_w8a8_moe_model_takes_the_one_call_experts_and_keeps_its_tokens(tmp_path, monkeypatch):
    """bfloat16 under w8a8: one moe_experts_w8a8 call per MoE layer where the kernels have int8_gemm, the Python
    loop's tokens."""
    from tokenmill.kernels import cpu_kernel

    kernels = cpu_kernel.load()
    if kernels is None or not kernels.int8_gemm_available():
        pytest.skip("no VNNI int8_gemm here: w8a8 experts loop in Python")
    _one_call_matches_the_loop(tmp_path, monkeypatch, kernels, "moe_experts_w8a8", "w8a8_call", "bfloat16", "w8a8")
