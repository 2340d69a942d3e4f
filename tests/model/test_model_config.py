import pytest
import torch

from tokenmill.model.layers import rope_inv_freq
from tokenmill.model.model_config import ModelConfig, UnsupportedModelError

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
