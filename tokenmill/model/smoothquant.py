"""SmoothQuant for ``w8a8`` Llama-family models: move activation outliers into the weights before quantizing.

Per-token 8-bit activations lose the small channels of a token that has a few huge ones (LLM activations have such
outlier channels). SmoothQuant (Xiao et al., 2023) divides input channel j of a linear layer by
``s_j = max|X_j| ** alpha / max|W[:, j]| ** (1 - alpha)`` and multiplies the weight's column j by it, which leaves
the product unchanged and evens out the channels the 8-bit activation codes must cover. The division is folded into what
produces the input, so it costs nothing at run time:

- q/k/v projections: their input is ``input_layernorm``'s output, so its weight is divided by s;
- gate/up projections: ``post_attention_layernorm``'s weight;
- down projection: its input is ``silu(gate) * up``, linear in up, so up's rows are divided by s.

Gemma (norms applied as 1 + w) is not smoothed. A mixture-of-experts layer (model/moe.py) smooths only q/k/v: its post-attention norm also feeds the float router,
whose choice of experts must not move, and each expert would want factors of its own.
(The attention output projection is left alone: its input channels are shared across a GQA group and it is the
least sensitive layer, measured.) ``max|X_j|`` comes from one forward pass over a calibration text shipped with
tokenmill (``data/calibration.txt``, not the eval text), run on the model with int8 weight-only layers (activations
in float: the statistics of the float model, within int8 weight rounding, and half the memory of bfloat16). The
factors are cached per model file in ``~/.cache/tokenmill/smoothquant/``, so later loads read the checkpoint once.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from tokenmill.attention.backend import AttentionMetadata, ReferenceAttention
from tokenmill.model.layers import Linear

CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
ALPHA = 0.5  # chosen by measurement (BENCHMARKS.md "Quantization")
VERSION = 3  # 2: calibrated on int8 weights in groups of 32 (was per channel); 3: asymmetric groups
_SMOOTHED = ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")

Factors = dict[int, dict[str, torch.Tensor]]  # layer index -> {"qkv", "gate_up", "down"} -> s [in_features] float32


@torch.inference_mode()
def prefill(net, token_ids: list[int]) -> torch.Tensor:
    """The model's final hidden states [n, hidden] for one sequence, with a cache just big enough and reference
    attention (no engine needed)."""
    cfg, n, bs = net.config, len(token_ids), 16
    blocks = -(-n // bs)
    dtype = net.activation_dtype
    shape = (blocks, bs, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata(query_start_loc=[0, n], seq_lens=[n], num_decodes=0,
                             slot_mapping=torch.arange(n, dtype=torch.int64),
                             block_tables=torch.arange(blocks, dtype=torch.int64)[None, :],
                             seq_lens_tensor=torch.tensor([n], dtype=torch.int64))
    return net(torch.tensor(token_ids, dtype=torch.int64), torch.arange(n, dtype=torch.int64), caches, meta,
               ReferenceAttention())


def input_absmax(net, token_ids: list[int]) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every decoder linear layer over one prefill of ``token_ids``."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in net.named_modules():
        if isinstance(m, Linear) and name.startswith("layers."):
            def record(module, args, name=name):
                a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
                stats[name] = a if name not in stats else torch.maximum(stats[name], a)
            hooks.append(m.register_forward_pre_hook(record))
    try:
        prefill(net, token_ids)
    finally:
        for h in hooks:
            h.remove()
    return stats


def weight_column_absmax(layer: Linear) -> torch.Tensor:
    """max |W[:, j]| of a float or int8 weight-only layer: [in_features] float32."""
    if layer.quantized is None:
        return layer.dense_weight().abs().amax(0).float()
    return layer.quantized.column_absmax()


def smoothing_factors(net, stats: dict[str, torch.Tensor], alpha: float = ALPHA) -> Factors:
    factors: Factors = {}
    if net.config.norm_plus_one:  # Gemma's norms multiply by (1 + w): a factor cannot fold into the file's w
        return factors
    for i in range(len(net.layers)):
        per_layer = {}
        for key, suffix in zip(("qkv", "gate_up", "down"), _SMOOTHED):
            name = f"layers.{i}.{suffix}"
            if name not in stats:  # a MoE layer's experts: not smoothed
                continue
            layer = net.get_submodule(name)
            x = stats[name].clamp(min=1e-5)
            w = weight_column_absmax(layer).clamp(min=1e-5)
            per_layer[key] = (x.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
        factors[i] = per_layer
    return factors


_NAME = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")


def smooth(weights: Iterable[tuple[str, torch.Tensor]], factors: Factors
           ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (HF name, float tensor) pairs with the factors folded in (see the module docstring)."""
    for hf_name, w in weights:
        m = _NAME.fullmatch(hf_name)
        if m is None or int(m.group(1)) not in factors:
            yield hf_name, w
            continue
        f, rest = factors[int(m.group(1))], m.group(2)
        if rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"):
            w = w * f["qkv"]
        elif rest == "mlp.gate_proj.weight":
            w = w * f["gate_up"]
        elif rest == "mlp.up_proj.weight":
            w = w * f["gate_up"] / f["down"][:, None]
        elif rest == "mlp.down_proj.weight":
            w = w * f["down"]
        elif rest == "input_layernorm.weight":
            w = w / f["qkv"]
        elif rest == "post_attention_layernorm.weight" and "gate_up" in f:
            w = w / f["gate_up"]
        yield hf_name, w


def cache_path(model_path: Path, cache_root: Path) -> Path:
    from tokenmill.model.fingerprint import model_fingerprint

    key = hashlib.sha256(f"{model_fingerprint(model_path)}|{ALPHA}|v{VERSION}|".encode()
                         + CALIBRATION_TEXT.read_bytes()).hexdigest()[:16]
    return cache_root / "smoothquant" / f"{key}.pt"


def load_or_calibrate(model_path: Path, cache_root: Path, build_calibration_model, tokenizer) -> Factors:
    """The cached factors for this model file, or: build the int8 weight-only model (``build_calibration_model()``),
    run the calibration text through it, compute and cache the factors."""
    path = cache_path(model_path, cache_root)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except Exception:  # a damaged cache file: calibrate again
            pass
    net = build_calibration_model()
    ids = tokenizer(CALIBRATION_TEXT.read_text(), add_special_tokens=False).input_ids
    ids = ids[:net.rotary.max_positions]
    factors = smoothing_factors(net, input_absmax(net, ids))
    del net
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{id(factors)}.tmp")
    torch.save(factors, tmp)
    tmp.replace(path)
    return factors
