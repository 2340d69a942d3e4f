"""``kv_cache_dtype="fp8"``: the KV cache in float8 e4m3. It holds 4x float32's tokens in the same memory, every
attention backend reads it back the same, and on SmolLM2 it costs little perplexity (the eval command end to end)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import read_jsonl, save_tiny_model
from tokenmill import LLM
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.model.model_config import ModelConfig
from tokenmill.worker.memory import kv_bytes_per_block, kv_cache_dtype, plan_num_blocks


def test_kv_cache_dtype_is_checked():
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
        EngineConfig.from_dict({"kv_cache_dtype": "int8"})


def test_fp8_cache_holds_four_times_the_float32_tokens():
    mc = ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 100})
    cpu = torch.device("cpu")
    f32 = EngineConfig(kv_cache_memory=0.01, max_model_len=64)
    fp8 = f32.replace(kv_cache_dtype="fp8")
    assert kv_cache_dtype(f32, torch.float32) == torch.float32
    assert kv_cache_dtype(fp8, torch.bfloat16) == torch.float8_e4m3fn
    assert kv_bytes_per_block(mc, 16, torch.float32) == 4 * kv_bytes_per_block(mc, 16, torch.float8_e4m3fn)
    f32_blocks, fp8_blocks = plan_num_blocks(f32, mc, torch.float32, cpu), plan_num_blocks(fp8, mc, torch.float32, cpu)
    assert 4 * f32_blocks <= fp8_blocks < 4 * (f32_blocks + 1)  # the same budget, floored to whole blocks


def test_every_backend_reads_the_fp8_cache_alike(tmp_path):
    """The backends attend over the same stored float8 values, so their log-probabilities agree to float32 rounding;
    against a float32 cache they differ (the cache really is float8) by about e4m3's relative step."""
    save_tiny_model("llama", tmp_path / "m")
    ids = [(7 * i + 3) % 200 + 5 for i in range(45)]  # several blocks, a partial last one
    scores = {}
    for kv, backend in [("fp8", "cpu_kernel"), ("fp8", "torch"), ("fp8", "triton"), ("fp8", "reference"),
                        ("auto", "cpu_kernel")]:
        llm = LLM(str(tmp_path / "m"), kv_cache_memory=0.05, block_size=4, kv_cache_dtype=kv, attention_backend=backend)
        assert llm.engine.runner.kv_caches[0][0].dtype == (torch.float8_e4m3fn if kv == "fp8" else torch.float32)
        scores[kv, backend] = torch.tensor(llm.engine.score(ids))
    ref = scores["fp8", "reference"]
    torch.testing.assert_close(scores["fp8", "cpu_kernel"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores["fp8", "torch"], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scores["fp8", "triton"], ref, atol=1e-4, rtol=1e-4)  # interpreted on CPU
    diff = (scores["auto", "cpu_kernel"] - ref).abs().max().item()
    assert 1e-4 < diff < 0.1


def test_the_eval_command_measures_the_fp8_cache_on_smollm2(run_cli):
    p = run_cli("eval", "--kv-cache-dtype", "fp8", "--limit-tokens", 600, "--max-tokens", 4, "--json", check=0)
    r = json.loads(p.stdout)
    assert r["kv_cache_dtype"] == "fp8" and r["setting"] == "float32 kv-cache fp8"
    assert r["reference"]["dtype"] == "float32"
    assert abs(r["perplexity_change"]) < 0.01  # measured -0.16% on the whole default text (BENCHMARKS.md)


def test_a_resume_with_another_kv_cache_dtype_is_refused(tmp_path, run_cli):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Count to {i}:"}) + "\n" for i in range(3)))
    out = tmp_path / "out.jsonl"
    run_cli("run", inp, "-o", out, "--max-tokens", 4, "--kv-cache-dtype", "fp8", "--quiet", check=0)
    assert len(read_jsonl(out)) == 3
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert manifest["settings"]["engine_options"]["kv_cache_dtype"] == "fp8"
    refused = run_cli("run", inp, "-o", out, "--max-tokens", 4, "--quiet", check=2)
    assert "kv_cache_dtype" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_the_fp8_cache_is_written_alike_without_the_kernels():
    """Where the C++ kernels do not run (TorchOps: no compiler, CUDA without Triton, the reference), write_kv casts and
    copies through index_copy_ on a byte view (torch has no index_copy_ for float8): the same cache bytes as the
    kernel's row copy."""
    from tokenmill.attention import backend
    from tokenmill.kernels import cpu_kernel

    torch.manual_seed(2)
    k, v = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([9, 0, 4, 31, 17])
    caches = [torch.zeros(4, 8, 2, 16, dtype=torch.float8_e4m3fn) for _ in range(4)]
    cpu_kernel.load().write_kv(k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), caches[0], caches[1], slots)
    backend.write_kv(k, v, caches[2], caches[3], slots)
    for with_kernels, without in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(with_kernels.view(torch.uint8), without.view(torch.uint8))
    assert torch.equal(caches[2].view(-1, 2, 16)[slots].float(), k.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_read_every_fp8_code_exactly(kernels, q_dtype):
    """Each of the 254 finite e4m3 codes, subnormals (|x| < 2^-6) included, read back by the decode kernel equals
    torch's cast: one key per request, so the output is its V row times a softmax weight of exactly 1."""
    codes = torch.tensor([c for c in range(256) if c not in (0x7F, 0xFF)] + [0, 0], dtype=torch.uint8)  # 256
    v_rows = codes.view(4, 64)  # 4 requests, head_dim 64, one KV head
    v_cache = torch.zeros(4, 16, 1, 64, dtype=torch.uint8)
    v_cache[:, 0, 0] = v_rows  # request r's only token is slot 0 of block r
    v_cache = v_cache.view(torch.float8_e4m3fn)
    k_cache = torch.zeros_like(v_cache)
    q = torch.ones(4, 1, 64, dtype=q_dtype)
    out = kernels.paged_attention(q, k_cache, v_cache, torch.arange(4).view(4, 1), torch.ones(4, dtype=torch.int64),
                                  torch.arange(5), 0.125)
    want = v_rows.contiguous().view(torch.float8_e4m3fn).float().view(4, 1, 64)
    assert want.abs().min() == 0 and 0 < want[want != 0].abs().min() < 2**-6  # zero and subnormals are in it
    assert torch.equal(out.float(), want.to(q_dtype).float())
