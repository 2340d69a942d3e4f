import pytest
import torch

from tokenmill.model.layers import rope_inv_freq
from tokenmill.model.model_config import ModelConfig, UnsupportedModelError
from tokenmill.model.sampler import Sampler
from tokenmill.sampling_params import SamplingParams

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
}


def test_classic_rope_scaling_keys_and_defaults():
    cfg = ModelConfig.from_hf_dict(
        {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                          "original_max_position_embeddings": 8192}}
    )
    assert cfg.rope.rope_type == "llama3" and cfg.rope.theta == 500000.0 and cfg.rope.factor == 8.0
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16 and not cfg.attention_bias


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=2, rope_parameters=rope)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(128, ModelConfig.from_hf_dict({**BASE, **hf_cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}).rope)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_unsupported_rope_and_architecture_are_named():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict({**BASE, "architectures": ["FalconForCausalLM"]})


def test_sampler_filters_collapse_to_greedy_and_seeds_are_private():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=5)]
    out = sampler(logits, ["a", "b", "c", "d"], params)
    greedy = logits.argmax(-1).tolist()
    assert out.token_ids[:3] == greedy[:3]
    # the seeded row draws the same token whatever else is in the batch
    alone = Sampler(seed=123, device=torch.device("cpu"))(logits[3:], ["d"], params[3:])
    assert alone.token_ids[0] == out.token_ids[3]


def test_sampler_top_k_never_leaves_the_top_k():
    torch.manual_seed(1)
    logits = torch.randn(1, 1000)
    top3 = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    draws = {sampler(logits, [f"r{i}"], [SamplingParams(temperature=2.0, top_k=3)]).token_ids[0] for i in range(200)}
    assert draws <= top3 and len(draws) == 3


def test_sampler_on_bfloat16_logits_equals_their_float32_widening():
    """The runner hands the sampler bfloat16 logits as the LM head computed them: greedy, seeded and logprob rows
    must come out exactly as from the same values widened to float32 (the widening is exact)."""
    torch.manual_seed(2)
    logits = torch.randn(5, 3000).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0, top_p=0.9, seed=4),
              SamplingParams(temperature=0.0)]
    ids = [f"r{i}" for i in range(5)]
    out16 = Sampler(seed=0, device=torch.device("cpu"))(logits, ids, params)
    out32 = Sampler(seed=0, device=torch.device("cpu"))(logits.float(), ids, params)
    assert out16.token_ids == out32.token_ids
    assert out16.logprobs == out32.logprobs and out16.logprobs[2] is not None
    assert out16.token_ids[0] == logits[0].float().argmax().item()
