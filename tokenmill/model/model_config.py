"""ModelConfig: the architecture facts tokenmill needs, read from an HF ``config.json`` dict.

Supports both the classic keys (``rope_theta`` + ``rope_scaling``) and transformers 5's ``rope_parameters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                       "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Mixture-of-experts decoders (model/moe.py): top-k routed experts in place of (some of) the layers' MLPs.
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
SUPPORTED_ARCHITECTURES = DENSE_ARCHITECTURES + MOE_ARCHITECTURES
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
# Bare decoder stacks (no LM head), as embedding models such as Qwen3-Embedding ship them.
BASE_MODEL_ALIASES = {"LlamaModel": "LlamaForCausalLM", "MistralModel": "MistralForCausalLM",
                      "Qwen2Model": "Qwen2ForCausalLM", "Qwen3Model": "Qwen3ForCausalLM"}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): per-frequency divisors for sequences within
    # original_max_position_embeddings (short) and beyond it (long), and the scale on cos / sin
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def long_rope_from(self) -> int | None:
        """LongRoPE's switch: a token takes the long factors when its request's prompt is longer than this, or when
        it sits at this position or later (transformers picks the set per forward pass by its longest position: the
        whole prompt in one pass, then one token per pass). None for the other RoPE types."""
        return self.original_max_position_embeddings if self.rope_type == "longrope" else None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections (Qwen2 always)
    qk_norm: bool  # RMSNorm on q and k per head before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rotary_dim: int = 0  # RoPE on the first rotary_dim channels of each head (partial_rotary_factor); 0 = all
    # Attention over the last ``sliding_window`` positions only (Mistral, Phi-3; Gemma's sliding layers), in the
    # layers ``layer_windows`` gives one (all layers when it is empty).
    sliding_window: int | None = None
    layer_windows: tuple[int | None, ...] = ()
    # Gemma: GeGLU MLPs, embeddings scaled by sqrt(hidden), RMSNorm weights applied as (1 + w), norms before and
    # after attention and MLP ("sandwich"), the attention scale from query_pre_attn_scalar, capped attention scores
    # (Gemma 2) and capped logits; Gemma 3's sliding layers use their own RoPE (``local_rope``).
    hidden_act: str = "silu"
    embedding_scale: float | None = None
    norm_plus_one: bool = False
    sandwich_norms: bool = False
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    local_rope: RopeConfig | None = None
    qk_norm_whole: bool = False  # RMSNorm over all of q's (k's) heads at once, before the split (OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to +-clip_qkv after the projection (OLMoE's option)
    # Mixture of experts (0 experts: a dense model). ``moe_layers``: the layers whose MLP is the routed experts (the
    # others keep a dense MLP of ``intermediate_size``); each token goes to its ``num_experts_per_tok`` most probable
    # experts (softmax over the router's logits), weighted by those probabilities, renormalised to sum to 1 when
    # ``norm_topk_prob``. Qwen2-MoE adds a shared expert of ``shared_expert_intermediate_size`` to every token,
    # scaled by sigmoid(its own gate).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if "Gemma3ForConditionalGeneration" in (d.get("architectures") or []) and isinstance(d.get("text_config"), dict):
            # Gemma 3 4B-27B ship as image+text models: tokenmill runs their language model (text in, text out)
            top = {k: d[k] for k in ("bos_token_id", "eos_token_id", "tie_word_embeddings") if d.get(k) is not None}
            d = {**top, **d["text_config"], "architectures": ["Gemma3ForCausalLM"]}
        archs = [BASE_MODEL_ALIASES.get(a, a) for a in d.get("architectures") or []]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported model architecture {archs or d.get('model_type')!r}; tokenmill supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = d["hidden_size"]
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or hidden // heads
        rope = _rope_config(d)
        rotary_dim = int(head_dim * _partial_rotary_factor(d))
        if rope.rope_type == "longrope" and len(rope.short_factor) != rotary_dim // 2:
            raise UnsupportedModelError(f"longrope factors have {len(rope.short_factor)} entries; a rotary dimension "
                                        f"of {rotary_dim} needs {rotary_dim // 2}")
        act = d.get("hidden_activation") or d.get("hidden_act") or "silu"
        if act != ("gelu_pytorch_tanh" if arch in GEMMA else "silu"):
            raise UnsupportedModelError(f"unsupported hidden_act {act!r} for {arch}")
        if arch == "Qwen2ForCausalLM":
            attention_bias = True
        elif arch == "Qwen2MoeForCausalLM":
            attention_bias = bool(d.get("qkv_bias", True))
        else:
            attention_bias = bool(d.get("attention_bias", False))
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rope=rope,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", arch in GEMMA)),
            attention_bias=attention_bias,
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForCausalLM"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            rotary_dim=rotary_dim,
            sliding_window=_sliding_window(arch, d),
            **_gemma_fields(arch, d, head_dim),
            qk_norm_whole=arch == "OlmoeForCausalLM",
            clip_qkv=float(d["clip_qkv"]) if d.get("clip_qkv") is not None else None,
            **_moe_fields(arch, d),
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def window_of(self, layer: int) -> int | None:
        """Layer ``layer``'s sliding window (None: it attends to everything before)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    FLOAT_LINEARS = ("moe_gate", "shared_expert_gate")  # the routers: never quantized (model/moe.py)

    def linear_shapes(self) -> list[tuple[str, int, int, int]]:
        """(name, out_features, in_features, count) of every linear layer in the decoder layers, over the whole
        model (count = how many such layers it has): what ``num_parameters``, the memory plan and fp8's per-row
        scales are counted from. The routers (``moe_gate``) are linears too; the LM head and embeddings are not."""
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        shapes = [("qkv_proj", (heads + 2 * kv) * d, h, L), ("o_proj", h, heads * d, L)]
        sparse = len(self.moe_layers)
        if L - sparse:
            shapes += [("gate_up_proj", 2 * self.intermediate_size, h, L - sparse),
                       ("down_proj", h, self.intermediate_size, L - sparse)]
        if sparse:
            e, i = self.num_experts, self.moe_intermediate_size
            shapes += [("moe_gate", e, h, sparse), ("expert_gate_up_proj", 2 * i, h, e * sparse),
                       ("expert_down_proj", h, i, e * sparse)]
            if self.shared_expert_intermediate_size:
                s = self.shared_expert_intermediate_size
                shapes += [("shared_expert_gate", 1, h, sparse), ("shared_expert_gate_up_proj", 2 * s, h, sparse),
                           ("shared_expert_down_proj", h, s, sparse)]
        return shapes

    def num_parameters(self, active: bool = False) -> int:
        """Every parameter: linears, their biases, norms, embeddings (and a separate LM head). ``active``: those
        one token uses (of a MoE layer's experts only ``num_experts_per_tok``), the figure FLOPs per token follow."""
        h, d, L = self.hidden_size, self.head_dim, self.num_hidden_layers
        total = 0
        for name, out, inp, count in self.linear_shapes():
            if active and name.startswith("expert_"):
                count = count // self.num_experts * self.num_experts_per_tok
            total += out * inp * count
        if self.attention_bias:
            total += (self.num_attention_heads + 2 * self.num_key_value_heads) * d * L
        norms = (4 if self.sandwich_norms else 2) * h + (2 * d if self.qk_norm else 0)
        if self.qk_norm_whole:
            norms += (self.num_attention_heads + self.num_key_value_heads) * d
        emb = self.vocab_size * h
        return total + L * norms + emb * (1 if self.tie_word_embeddings else 2) + h

    def mlp_width(self) -> int:
        """The widest gate|up activation one token makes in a layer (half of it): the dense MLP's intermediate size,
        or the routed experts' together (plus the shared expert's)."""
        routed = self.num_experts_per_tok * self.moe_intermediate_size + self.shared_expert_intermediate_size
        return max(self.intermediate_size if len(self.moe_layers) < self.num_hidden_layers else 0, routed)


def _partial_rotary_factor(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    factor = float(params.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
    if not 0 < factor <= 1:
        raise UnsupportedModelError(f"partial_rotary_factor={factor} must be in (0, 1]")
    return factor


def _gemma_fields(arch: str, d: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """ModelConfig's Gemma fields (none for other architectures)."""
    if arch not in GEMMA:
        return {}
    layers = d["num_hidden_layers"]
    types = d.get("layer_types")
    if not types:  # older configs: Gemma 2 alternates (sliding first), Gemma 3 every sliding_window_pattern-th global
        pattern = 2 if arch == "Gemma2ForCausalLM" else int(d.get("sliding_window_pattern", 6))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    window = d.get("sliding_window")
    fields: dict[str, Any] = dict(
        layer_windows=tuple(int(window) if t == "sliding_attention" and window else None for t in types),
        hidden_act="gelu_pytorch_tanh", embedding_scale=float(d["hidden_size"]) ** 0.5, norm_plus_one=True,
        sandwich_norms=True, attn_scale=float(d.get("query_pre_attn_scalar") or head_dim) ** -0.5,
        attn_softcap=d.get("attn_logit_softcapping"), final_softcap=d.get("final_logit_softcapping"))
    params = d.get("rope_parameters")
    if arch == "Gemma3ForCausalLM":
        if isinstance(params, dict) and isinstance(params.get("sliding_attention"), dict):
            local = params["sliding_attention"]
            fields["local_rope"] = _rope_config({"rope_parameters": local})
        else:
            fields["local_rope"] = RopeConfig(theta=float(d.get("rope_local_base_freq", 10000.0)))
    return fields


def _sliding_window(arch: str, d: dict[str, Any]) -> int | None:
    window = d.get("sliding_window")
    if arch.startswith("Qwen") and not d.get("use_sliding_window", False):
        return None  # Qwen configs carry a window they do not use
    return int(window) if window else None


def _moe_fields(arch: str, d: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's mixture-of-experts fields from an HF config of ``arch`` (none for a dense architecture)."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    num_layers = d["num_hidden_layers"]
    experts = d.get("num_experts") or d.get("num_local_experts") or 0  # transformers 5 writes the latter for all
    if experts <= 0:
        raise UnsupportedModelError(f"{arch} config has no num_experts / num_local_experts")
    if arch == "MixtralForCausalLM":  # every layer sparse; the experts' size is intermediate_size
        inter, norm_topk, layers = d["intermediate_size"], True, range(num_layers)
    elif arch == "OlmoeForCausalLM":
        inter, norm_topk, layers = d["intermediate_size"], False, range(num_layers)
    else:  # Qwen2-MoE / Qwen3-MoE: mlp_only_layers and decoder_sparse_step pick the sparse layers
        inter, norm_topk = d.get("moe_intermediate_size") or d["intermediate_size"], False
        step, dense = d.get("decoder_sparse_step", 1) or 1, set(d.get("mlp_only_layers") or ())
        layers = [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]
    top_k = d.get("num_experts_per_tok", 2)
    if not 0 < top_k <= experts:
        raise UnsupportedModelError(f"{arch}: num_experts_per_tok={top_k} must be in 1..num_experts={experts}")
    return dict(
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=inter,
        norm_topk_prob=norm_topk or bool(d.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0)
        if arch == "Qwen2MoeForCausalLM" else 0,
        moe_layers=tuple(layers),
    )



def _rope_config(d: dict[str, Any]) -> RopeConfig:
    params = d.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):  # per layer type (Gemma 3)
        params = params["full_attention"]
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = params
        theta = params["rope_theta"]
    else:
        scaling = d.get("rope_scaling") or {}
        theta = d.get("rope_theta", 10000.0)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"unsupported rope_scaling type {rope_type!r}; tokenmill supports {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "longrope":
        return _longrope_config(d, scaling, float(theta))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )


def _longrope_config(d: dict[str, Any], scaling: dict[str, Any], theta: float) -> RopeConfig:
    """transformers' rules: the original length from the scaling dict or the config's top level; ``factor`` (if
    absent, max_position_embeddings over the original length) sets the default attention factor
    sqrt(1 + ln(factor) / ln(original)) (1 when factor <= 1)."""
    original = scaling.get("original_max_position_embeddings") or d.get("original_max_position_embeddings") \
        or d.get("max_position_embeddings")
    short, long = scaling.get("short_factor"), scaling.get("long_factor")
    if not original or not short or not long or len(short) != len(long):
        raise UnsupportedModelError("a longrope rope_scaling needs short_factor and long_factor of one length and "
                                    "original_max_position_embeddings")
    factor = scaling.get("factor") or d.get("max_position_embeddings", original) / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeConfig(theta=theta, rope_type="longrope", factor=float(factor),
                      original_max_position_embeddings=int(original), short_factor=tuple(map(float, short)),
                      long_factor=tuple(map(float, long)), attention_factor=float(attention))
