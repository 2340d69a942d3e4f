"""Shared test helpers: tiny random-weight HF models on disk, the transformers greedy oracle, token comparison."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,  # sharper logits than the default 0.02: fewer near-ties in greedy decoding
    bos_token_id=2,
    eos_token_id=1,
)


def tiny_config(arch: str, **overrides):
    """A tiny config of ``arch``; ``overrides`` replace TINY's values (e.g. an odd vocabulary)."""
    import transformers as tf

    TINY = {**globals()["TINY"], **overrides}  # noqa: N806 (the module's table, overridden)

    if arch == "llama":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=False)
    if arch == "llama3_tied":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters=rope)
    if arch == "mistral":
        return tf.MistralConfig(**{"sliding_window": None, **TINY}, tie_word_embeddings=False)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY, tie_word_embeddings=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=32, tie_word_embeddings=False)
    if arch == "phi3":  # fused qkv / gate_up in the checkpoint, RoPE on half of each head
        return tf.Phi3Config(**{"sliding_window": None, **TINY}, pad_token_id=0, partial_rotary_factor=0.5,
                             tie_word_embeddings=False)
    if arch == "phi3_longrope":  # Phi-3.5 / Phi-4-mini's LongRoPE: prompts and outputs on both sides of 32 tokens
        half = 8 // 2  # rotary dim (head_dim 16, partial 0.5) / 2 frequencies
        return tf.Phi3Config(**{"sliding_window": None, **TINY}, pad_token_id=0, partial_rotary_factor=0.5,
                             tie_word_embeddings=False, original_max_position_embeddings=32,
                             rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                              "short_factor": [1.0 + 0.3 * i for i in range(half)],
                                              "long_factor": [1.0 + 2.5 * i for i in range(half)]})
    if arch == "mistral_window":  # a sliding window shorter than the prompts: the window bites
        return tf.MistralConfig(**{"sliding_window": 16, **TINY}, tie_word_embeddings=False)
    if arch == "gemma2":  # sandwich norms, GeGLU, softcapped scores and logits, alternating 16-token windows
        return tf.Gemma2Config(**TINY, head_dim=32, query_pre_attn_scalar=24, sliding_window=16,
                               attn_logit_softcapping=1.0, final_logit_softcapping=1.0, pad_token_id=0)
    if arch == "gemma3":  # q/k norms, every 2nd layer global with its own RoPE theta and linear scaling
        return tf.Gemma3TextConfig(**TINY, head_dim=32, query_pre_attn_scalar=32, sliding_window=16,
                                   sliding_window_pattern=2, pad_token_id=0,
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 100000.0},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 10000.0}})
    if arch == "gemma3_mm":  # Gemma 3 as 4B-27B ship: image+text, the language model under language_model.*
        text = {**TINY, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16, "sliding_window_pattern": 2,
                "pad_token_id": 0}
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, bos_token_id=2,
                               eos_token_id=1)
    # mixtures of experts: 4 experts, top-2 (MoE shapes smaller than the dense MLP's, as real ones are)
    if arch == "mixtral":
        return tf.MixtralConfig(**{**TINY, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2_moe":  # a dense layer, a sparse one with a shared expert, top-k weights not renormalised
        return tf.Qwen2MoeConfig(**TINY, moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=4,
                                 num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=False,
                                 tie_word_embeddings=False)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(**TINY, head_dim=32, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                                 norm_topk_prob=True, tie_word_embeddings=False)
    if arch == "olmoe":  # q/k norms over all heads, clipped q/k/v
        return tf.OlmoeConfig(**{**TINY, "intermediate_size": 64}, num_experts=4, num_experts_per_tok=2,
                              clip_qkv=0.4, tie_word_embeddings=False)
    raise ValueError(arch)


def save_tiny_model(arch: str, path: Path, seed: int = 0, **overrides):
    """Writes a random-weight HF model directory (config, safetensors, a word-level tokenizer); returns the model."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    if isinstance(cfg, tf.Gemma3Config):  # image+text: its own class
        model = tf.Gemma3ForConditionalGeneration(cfg).float().eval()
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(str(path))
    vocab = {f"w{i}": i for i in range(getattr(cfg, "text_config", cfg).vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0", eos_token="w1", bos_token="w2")
    tokenizer.save_pretrained(str(path))
    return model


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own forward with its KV cache, argmax each step; returns tokens and each step's logits."""
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens, logits = [], []
    for _ in range(max_new_tokens):
        step_logits = out.logits[0, -1].float()
        logits.append(step_logits)
        tokens.append(int(step_logits.argmax()))
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


NEAR_TIE = 1e-3  # logit gap below which float32 summation order may legitimately pick the other token


def assert_greedy_equal(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor], label: str,
                        tie: float = NEAR_TIE) -> None:
    """Exact equality expected. A divergence is only tolerated at a near-tie of the reference's top two logits (a gap
    under ``tie``: wider where the path under test rounds activations on purpose), and then it is reported as a
    warning naming the position and the gap; tokens after it are not compared."""
    assert len(ours) == len(ref), f"{label}: {len(ours)} tokens, reference has {len(ref)}"
    if ours == ref:
        return
    j = next(i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
    top2 = ref_logits[j].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < tie, (
        f"{label}: token {j} differs ({ours[j]} vs reference {ref[j]}) and the reference's top-2 logit gap is "
        f"{gap:.3g}: not a near-tie, so this is a real divergence"
    )
    warnings.warn(f"{label}: diverged at token {j} at a near-tie of the top two logits (gap {gap:.2e})")


def save_lora_adapter(base_path, out, rank: int, alpha: float, targets: list[str], rslora: bool, seed: int,
                      target_parameters: list[str] | None = None, **lora_kw):
    """A PEFT LoRA adapter of the HF model at ``base_path`` with random factors, saved to ``out``; returns the PEFT
    model (the reference). ``target_parameters``: PEFT's adapters of parameters (a mixture of experts' fused
    experts); ``lora_kw``: more LoraConfig fields (rank_pattern, alpha_pattern)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0,
                     target_parameters=target_parameters, **lora_kw)
    peft_model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:  # PEFT starts B at zero (no effect): random factors make every adapter matter
            p.data = torch.randn(p.shape, generator=g) * 0.15
    peft_model.save_pretrained(str(out))
    return peft_model.eval()


def prompt_logprobs(llm, ids: list[int], lora: str | None = None) -> torch.Tensor:
    """Each prompt token's log-probability (after the first) under adapter ``lora`` (None: the base model)."""
    from tokenmill import SamplingParams

    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, lora=lora),
                       use_tqdm=False)[0]
    return torch.tensor([lp[t] for lp, t in zip(out.prompt_logprobs[1:], ids[1:])])


def held_lora_bytes(model) -> int:
    """The bytes a built model's LoRA modules hold (every stacked factor, as attached)."""
    from tokenmill.model.lora import ExpertLoraWeights, LoraWeights

    total = 0
    for m in model.modules():
        if isinstance(m, LoraWeights):
            total += sum(t.nbytes for t in m.buffers(recurse=False))
        elif isinstance(m, ExpertLoraWeights):
            total += sum(getattr(m, k).nbytes for k in ("a", "bt", "a_all", "b_all") if hasattr(m, k))
    return total


def tokenmill_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", *map(str, args)]


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]
