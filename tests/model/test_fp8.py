"""fp8 weights and activations (model/fp8.py): the layer against the product of its dequantized operands, and whole
tiny models against transformers' own forward with the same rounding applied (weights replaced by their e4m3
values, each linear layer's input rounded per token the same way): greedy tokens equal, alone and in a busy batch."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.model.fp8 import FP8, FP8_MAX, FP8Weight, quantize_fp8_rows


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_rows_quantize_within_e4m3_rounding():
    x = _rand(9, 64, seed=1)
    x[0, 5] = 300.0  # an outlier sets its row's scale
    x[1] = 0.0  # a zero row keeps a finite scale
    q, s = quantize_fp8_rows(x)
    assert q.dtype == FP8 and s.shape == (9,) and torch.isfinite(s).all()
    back = q.float() * s[:, None]
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normal values, absolute 2^-9 * scale below them
    err = (back - x).abs()
    assert (err <= x.abs() / 16 + s[:, None] * 2.0 ** -9 + 1e-12).all()
    assert float(q.float().abs().amax(dim=1)[0]) == FP8_MAX  # the row's largest value maps to e4m3's largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(64, 48), (40, 24)])  # _scaled_mm's shapes; K not a multiple of 16: the fallback
def test_fp8_layer_equals_the_product_of_its_dequantized_operands(dtype, k, n):
    w, x = _rand(n, k, seed=2), _rand(7, k, seed=3).to(dtype)
    bias, res = _rand(n, seed=4).to(dtype), _rand(7, n, seed=5).to(dtype)
    layer = FP8Weight(n, k)
    layer.load_rows(0, w[: n // 2])
    layer.load_rows(n // 2, w[n // 2:])  # shards quantize alone: rows are independent
    layer.finalize(dtype)
    assert layer.scaled_mm == (k % 16 == 0 and n % 16 == 0)
    got = layer(x, bias, res)
    xq, xs = quantize_fp8_rows(x)
    want = (xq.double() * xs.double()[:, None]) @ layer.dequantize().double().t() + bias.double() + res.double()
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # bfloat16: the result's own rounding
    assert got.dtype == dtype
    assert torch.allclose(got.double(), want, rtol=tol, atol=tol)
    wq, _ = quantize_fp8_rows(w)
    assert torch.equal(layer.qweight.view(torch.uint8), wq.view(torch.uint8))


def _fp8_transformers(path):
    """transformers' model with fp8's rounding: every linear layer but the LM head gets its e4m3 weight, and its
    input rounded to e4m3 per token (a forward pre-hook)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def round_input(_module, args):
        x = args[0]
        q, s = quantize_fp8_rows(x.reshape(-1, x.shape[-1]))
        return ((q.float() * s[:, None]).reshape(x.shape),)

    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            q, s = quantize_fp8_rows(mod.weight.data)
            mod.weight.data = q.float() * s[:, None]
            mod.register_forward_pre_hook(round_input)
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp8_models_equal_transformers_with_the_same_rounding(tmp_path, arch):
    save_tiny_model(arch, tmp_path / arch)
    hf = _fp8_transformers(str(tmp_path / arch))
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    refs = [hf_greedy(hf, p, 10) for p in prompts]
    llm = LLM(str(tmp_path / arch), quantization="fp8", block_size=4, num_kv_blocks=64, max_model_len=128,
              max_num_batched_tokens=48, prefill_chunk_size=7, max_num_seqs=16)
    assert isinstance(llm.engine.runner.model.layers[0].mlp.down_proj.quantized, FP8Weight)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    alone = llm.generate([prompts[0]], params, use_tqdm=False)[0]
    assert_greedy_equal(alone.token_ids, *refs[0], f"{arch} fp8 alone")
    for i, (out, (ref, ref_logits)) in enumerate(zip(llm.generate(prompts, params, use_tqdm=False), refs)):
        assert_greedy_equal(out.token_ids, ref, ref_logits, f"{arch} fp8 prompt {i} in a busy batch")


def test_fp8_weights_take_under_half_of_float32s_bytes(tmp_path):
    save_tiny_model("llama", tmp_path / "m", hidden_size=128, intermediate_size=512)
    sizes = {q: LLM(str(tmp_path / "m"), quantization=q, kv_cache_memory=0.01).engine.weight_bytes
             for q in ("none", "fp8")}
    assert sizes["fp8"] < 0.5 * sizes["none"]  # the linears dominate this shape (a quarter, plus the float rest)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "olmoe"])
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_a_plan_counts_the_weights_it_will_load(tmp_path, quantization, arch):
    """``tokenmill plan`` on CUDA subtracts the weights before they are loaded (worker/memory.planned_weight_bytes):
    the count equals what the loaded model holds, the RoPE tables aside (biases, q/k norms, every expert, the
    routers kept float, fp8's per-row scales included)."""
    from tokenmill.worker.memory import planned_weight_bytes

    sizes = dict(hidden_size=128, intermediate_size=512) if arch in ("llama", "qwen2", "qwen3") else {}
    save_tiny_model(arch, tmp_path / "m", **sizes)
    engine = LLM(str(tmp_path / "m"), quantization=quantization, kv_cache_memory=0.01).engine
    planned = planned_weight_bytes(engine.config, engine.model_config, engine.dtype)
    rope = sum(b.numel() * b.element_size() for n, b in engine.runner.model.named_buffers() if n.endswith(("cos", "sin")))
    assert engine.weight_bytes - rope == planned


def test_the_plan_shows_a_moe_models_total_and_active_parameters(tmp_path):
    from tokenmill.jobs.runner import JobContext

    hf = save_tiny_model("mixtral", tmp_path / "m")
    ctx = JobContext(str(tmp_path / "m"), {"kv_cache_memory": 0.01}, {"max_tokens": 8})
    p = ctx.plan([10, 20, 30], [8, 8, 8])
    assert p.parameters == sum(t.numel() for t in hf.parameters())
    experts = 2 * 4 * 3 * 64 * 64  # 2 layers x 4 experts x gate / up / down of 64 x 64; 2 of the 4 a token
    assert p.parameters - p.active_parameters == experts // 2
    assert "B active per token" in p.render() and p.weight_gib == p.parameters * 4 / 2**30
