"""The CUDA path on a real device: skipped where there is none (every run on the project's CPU machines), run as is
on a GPU machine (``pytest tests/gpu``). What the interpreter tests cannot show: the kernels compiled for the device,
``device="auto"`` choosing CUDA and Triton, dummy weights made on the device, the KV pool under
``gpu_memory_utilization``, the sampler on device tensors, swap space in pinned host memory, fp8 GEMMs, and two
ranks over NCCL."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy, save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prompts(vocab: int, n: int = 12) -> list[list[int]]:
    rng = random.Random(3)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 60))] for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cuda") / "llama"
    return path, save_tiny_model("llama", path)


def test_auto_picks_cuda_and_triton_and_equals_transformers(tiny):
    from tokenmill import LLM, SamplingParams
    from tokenmill.ops.triton_ops import TritonOps

    path, hf = tiny
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, gpu_memory_utilization=0.5)
    assert llm.engine.device.type == "cuda" and isinstance(llm.engine.ops, TritonOps)
    prompts = _prompts(hf.config.vocab_size)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref, ref_logits = hf_greedy(hf, p, 16)
        assert_greedy_equal(o.token_ids, ref, ref_logits, "cuda triton busy batch")


def test_swap_preemption_through_pinned_host_memory_equals_transformers(tiny):
    from tokenmill import LLM, SamplingParams

    path, hf = tiny
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=48, max_model_len=128, max_num_seqs=32,
              max_num_batched_tokens=64, preemption_mode="swap", swap_space=1e-3)
    assert llm.engine.runner.swap_caches[0][0].is_pinned()
    prompts = _prompts(hf.config.vocab_size, n=24)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert llm.engine.stats.num_swap_outs > 0
    for p, o in zip(prompts, outs):
        ref, ref_logits = hf_greedy(hf, p, 16)
        assert_greedy_equal(o.token_ids, ref, ref_logits, "cuda swap preemption")


def test_fp8_runs_scaled_mm_on_the_device_and_stays_close_to_float(tiny):
    from tokenmill import LLM
    from tokenmill.model.fp8 import FP8Weight

    path, _ = tiny
    ids = [(5 * i + 1) % 200 + 3 for i in range(40)]
    ref = torch.tensor(LLM(str(path), gpu_memory_utilization=0.3).engine.score(ids))
    llm = LLM(str(path), quantization="fp8", gpu_memory_utilization=0.3)
    layer = llm.engine.runner.model.layers[0].mlp.down_proj.quantized
    assert isinstance(layer, FP8Weight) and layer.qweight.is_cuda and layer.scaled_mm
    ours = torch.tensor(llm.engine.score(ids))
    assert (ours - ref).abs().mean() < 0.1


def test_bfloat16_default_and_the_kv_pool_stays_under_the_utilization(tiny):
    from tokenmill import LLM, SamplingParams

    path, _ = tiny
    torch.cuda.empty_cache()
    llm = LLM(str(path), gpu_memory_utilization=0.3)
    assert llm.engine.dtype == torch.bfloat16
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 4
    free, total = torch.cuda.mem_get_info()
    assert (total - free) <= 0.35 * total  # the pool came from what 0.3 leaves (plus allocator slack)


def test_dummy_weights_are_made_on_the_device(tmp_path):
    import json

    from tokenmill import LLM, SamplingParams

    (tmp_path / "m").mkdir()
    shape = Path(__file__).resolve().parents[2] / "benchmarks" / "shapes" / "qwen3-0.6b" / "config.json"
    cfg = json.loads(shape.read_text())
    cfg.update(num_hidden_layers=2)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tmp_path / "m"), load_format="dummy", max_model_len=512, gpu_memory_utilization=0.5)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.token_ids) == 3


def test_seeded_rows_on_the_device_do_not_depend_on_the_batch():
    from tokenmill.model.sampler import Sampler
    from tokenmill.sampling_params import SamplingParams

    torch.manual_seed(0)
    logits = torch.randn(6, 5000, device="cuda") * 3
    p = SamplingParams(temperature=0.9, top_p=0.9, seed=11)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)] * 2 + [SamplingParams()]
    alone = Sampler(0, torch.device("cuda"))(logits[2:3], [p], [4]).token_ids[0]
    busy = Sampler(1, torch.device("cuda"))(logits, others[:2] + [p] + others[2:], [0, 1, 4, 2, 3, 5]).token_ids
    assert busy[2] == alone


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_over_nccl_equal_one(tiny):
    from tokenmill import LLM, SamplingParams

    path, hf = tiny
    prompts = _prompts(hf.config.vocab_size)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    one = [o.token_ids for o in LLM(str(path), dtype="float32", gpu_memory_utilization=0.3).generate(
        prompts, params, use_tqdm=False)]
    with LLM(str(path), dtype="float32", tensor_parallel_size=2, gpu_memory_utilization=0.3) as llm:
        two = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert two == one


def test_cuda_graphs_replay_decode_steps_and_equal_eager(tiny):
    from tokenmill import LLM, SamplingParams

    path, hf = tiny
    prompts = _prompts(hf.config.vocab_size, n=20)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    graphs = LLM(str(path), dtype="float32", max_num_seqs=16, gpu_memory_utilization=0.3)
    assert graphs.engine.runner.graphs is not None  # captured and self-checked
    with_graphs = [o.token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert graphs.engine.runner.graphs.num_replays > 0
    eager = LLM(str(path), dtype="float32", max_num_seqs=16, gpu_memory_utilization=0.3, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    assert [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)] == with_graphs


def test_gemma2_windows_and_caps_decode_through_graphs_and_equal_eager(tmp_path):
    """Gemma 2's alternating windows and capped scores are the Triton kernel's own, so its decodes are captured too;
    the window (16) is shorter than most prompts, so it bites inside the replayed graphs."""
    from tokenmill import LLM, SamplingParams

    hf = save_tiny_model("gemma2", tmp_path)
    prompts = _prompts(hf.config.vocab_size, n=10)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    graphs = LLM(str(tmp_path), dtype="float32", max_num_seqs=16, gpu_memory_utilization=0.3)
    assert graphs.engine.runner.graphs is not None
    with_graphs = [o.token_ids for o in graphs.generate(prompts, params, use_tqdm=False)]
    assert graphs.engine.runner.graphs.num_replays > 0
    eager = LLM(str(tmp_path), dtype="float32", max_num_seqs=16, gpu_memory_utilization=0.3, enforce_eager=True)
    assert [o.token_ids for o in eager.generate(prompts, params, use_tqdm=False)] == with_graphs


def test_moe_experts_as_grouped_gemms_on_the_device_equal_transformers(tmp_path):
    """Qwen2-MoE (a shared expert, top-2 of 4) with its experts in the Triton grouped GEMMs, compiled for the device,
    in a busy batch: greedy tokens equal transformers' in float32."""
    from tokenmill import LLM, SamplingParams

    hf = save_tiny_model("qwen2_moe", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", max_num_batched_tokens=64, max_num_seqs=8, gpu_memory_utilization=0.3)
    assert all(m.stacked is not None for m in llm.engine.runner.model.modules() if hasattr(m, "stacked"))
    prompts = _prompts(hf.config.vocab_size)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref, ref_logits = hf_greedy(hf, p, 16)
        assert_greedy_equal(o.token_ids, ref, ref_logits, "cuda grouped experts")
