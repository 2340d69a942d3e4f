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


# Phi-3.5-mini-instruct's config.json, as published (classic keys: the original length at the top level, no factor)
PHI35_MINI = {"architectures": ["Phi3ForCausalLM"], "vocab_size": 32064, "hidden_size": 3072,
              "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
              "rope_theta": 10000.0,
              "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 100 for i in range(48)],
                               "long_factor": [1.0 + i for i in range(48)]}}


@pytest.mark.parametrize("long", [False, True])
def test_longrope_reads_phi35s_config_and_matches_transformers(long):
    """The original length from the top level, the attention factor sqrt(1 + ln(32) / ln(4096)) from 131072 / 4096,
    and each factor set's inverse frequencies equal to transformers' (its long set is what a sequence past 4,096
    tokens gets)."""
    import math

    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = ModelConfig.from_hf_dict(PHI35_MINI).rope
    assert rope.rope_type == "longrope" and rope.long_rope_from() == 4096 and len(rope.short_factor) == 48
    assert rope.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    hf_cfg = Phi3Config(**{k: v for k, v in PHI35_MINI.items() if k != "architectures"})
    ref, attention = ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=4097 if long else 100)
    torch.testing.assert_close(rope_inv_freq(96, rope, long), ref, rtol=0, atol=0)
    assert attention == pytest.approx(rope.attention_factor)
    with pytest.raises(UnsupportedModelError, match="short_factor and long_factor"):
        ModelConfig.from_hf_dict({**PHI35_MINI, "rope_scaling": {"type": "longrope", "short_factor": [1.0]}})
    with pytest.raises(UnsupportedModelError, match="a rotary dimension of 96 needs 48"):
        ModelConfig.from_hf_dict({**PHI35_MINI, "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 32,
                                                                 "long_factor": [1.0] * 32}})


def test_unsupported_rope_and_architecture_are_named():
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"type": "yarn", "factor": 2.0}})
    with pytest.raises(UnsupportedModelError, match="Qwen3ForCausalLM"):
        ModelConfig.from_hf_dict({**BASE, "architectures": ["FalconForCausalLM"]})


# ------------------------------------------------------------------ mixtures of experts: hand-computed counts
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "vocab_size": 32000, "hidden_size": 4096,
                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
                "tie_word_embeddings": False}
QWEN15_MOE_A27B = {"architectures": ["Qwen2MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                   "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                   "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 60,
                   "num_experts_per_tok": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "tie_word_embeddings": False}


def test_mixtral_8x7b_counts_its_published_parameters():
    """Per layer: attention 4096 x (4096 + 2 x 1024) + 4096 x 4096 = 41,943,040; experts 8 x 3 x 4096 x 14336 =
    1,409,286,144; router 8 x 4096; two norms 2 x 4096. Times 32 layers, plus 2 x 32000 x 4096 embeddings and the
    final norm: 46,702,792,704 (Mistral's "46.7B"); with 2 of 8 experts a token: 12,879,925,248 ("12.9B")."""
    from tokenmill.worker.memory import kv_bytes_per_block

    cfg = ModelConfig.from_hf_dict(MIXTRAL_8X7B)
    assert cfg.moe_layers == tuple(range(32)) and cfg.norm_topk_prob and cfg.moe_intermediate_size == 14336
    assert cfg.num_parameters() == 46_702_792_704
    assert cfg.num_parameters(active=True) == 12_879_925_248
    assert cfg.mlp_width() == 2 * 14336
    # K and V: 2 x 32 layers x 16 tokens x 8 heads x 128 x 2 bytes = 2 MiB a bfloat16 block, as for a dense model
    assert kv_bytes_per_block(cfg, 16, torch.bfloat16) == 2 * 2**20


def test_qwen15_moe_counts_its_published_parameters():
    """Per layer: qkv 2048 x 6144 + its bias 6144, o 2048 x 2048, 60 experts x 3 x 2048 x 1408, router 60 x 2048,
    shared expert 3 x 2048 x 5632 and its gate 2048, two norms: 570,560,512; times 24 plus 2 x 151936 x 2048 and the
    final norm: 14,315,784,192 ("14.3B"); 4 experts a token: 2,689,173,504 ("2.7B activated")."""
    cfg = ModelConfig.from_hf_dict(QWEN15_MOE_A27B)
    assert cfg.attention_bias and cfg.shared_expert_intermediate_size == 5632 and not cfg.norm_topk_prob
    assert cfg.num_parameters() == 14_315_784_192
    assert cfg.num_parameters(active=True) == 2_689_173_504


def test_moe_sparse_layers_and_bad_routing_are_read_or_named():
    cfg = ModelConfig.from_hf_dict({**QWEN15_MOE_A27B, "mlp_only_layers": [0, 5], "decoder_sparse_step": 2})
    assert cfg.moe_layers == tuple(i for i in range(24) if i % 2 == 1 and i != 5)
    dense = ModelConfig.from_hf_dict({**BASE})
    assert not dense.is_moe and dense.num_parameters(active=True) == dense.num_parameters()
    with pytest.raises(UnsupportedModelError, match="num_experts_per_tok=9"):
        ModelConfig.from_hf_dict({**MIXTRAL_8X7B, "num_experts_per_tok": 9})
    with pytest.raises(UnsupportedModelError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_dict({**MIXTRAL_8X7B, "hidden_act": "gelu"})


def test_sliding_windows_per_layer():
    """Mistral's window is every layer's; Gemma's alternate (its layer_types, or the pattern of older configs);
    Qwen configs carry a window they do not use (use_sliding_window false)."""
    cfg = ModelConfig.from_hf_dict({**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 32,
                                    "max_position_embeddings": 256})
    assert [cfg.window_of(i) for i in range(2)] == [32, 32] and cfg.max_position_embeddings == 256
    qwen = ModelConfig.from_hf_dict({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 32})
    assert qwen.window_of(0) is None
    gemma = {**BASE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 12, "sliding_window": 512,
             "hidden_activation": "gelu_pytorch_tanh", "head_dim": 16, "query_pre_attn_scalar": 256}
    g3 = ModelConfig.from_hf_dict(gemma)
    assert [g3.window_of(i) for i in range(12)] == [512] * 5 + [None] + [512] * 5 + [None]
    assert g3.tie_word_embeddings and g3.attn_scale == 256**-0.5 and g3.local_rope.theta == 10000.0
    assert g3.embedding_scale == 64**0.5 and g3.norm_plus_one and g3.sandwich_norms and g3.qk_norm
    with pytest.raises(UnsupportedModelError, match="hidden_act 'silu'"):
        ModelConfig.from_hf_dict({**gemma, "hidden_activation": "silu"})
