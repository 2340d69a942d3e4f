"""GGUF file -> HF model directory (config.json, model.safetensors, tokenizer files), cached on disk.

Reading and dequantising a GGUF file and converting its tokenizer takes several seconds; doing it once and loading
the cached directory afterwards keeps a cold start well under the 5 s target. The cache key is the file's resolved
path, size and modification time plus ``CONVERTER_VERSION``, so a changed file is converted again.

llama.cpp stores the Q and K projections of Llama-architecture models with rows permuted for its interleaved RoPE;
``_unpermute_qk`` undoes that so the weights match the HF layout our model uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CONVERTER_VERSION = 1

# GGUF general.architecture -> (HF architecture, whether Q/K rows are permuted by llama.cpp's converter)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokenmill"


def cached_hf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The converted HF directory for ``gguf_path``, converting it first if the cache has no valid copy."""
    gguf_path = gguf_path.resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    root = (cache_dir or default_cache_dir()) / "gguf"
    target = root / f"{gguf_path.stem}-{key}"
    if (target / "model.safetensors").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    import gguf
    import torch
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    fields = {name: f for name, f in reader.fields.items()}

    def meta(key: str, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; tokenmill supports {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    hf_arch, permuted = GGUF_ARCHITECTURES[arch]
    num_heads = int(meta(f"{arch}.attention.head_count"))
    num_kv_heads = int(meta(f"{arch}.attention.head_count_kv", num_heads))
    hidden = int(meta(f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF files with a rope_freqs tensor (llama3 RoPE scaling) are not supported yet")

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name = _hf_name(t.name)
        arr = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        if permuted and t.name.endswith("attn_q.weight"):
            arr = _unpermute_qk(arr, num_heads)
        elif permuted and t.name.endswith("attn_k.weight"):
            arr = _unpermute_qk(arr, num_kv_heads)
        if not arr.flags.writeable:  # unquantised tensors are read-only views of the memory-mapped file
            arr = arr.copy()
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(arr))

    vocab_size = int(meta(f"{arch}.vocab_size", 0)) or state["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": [hf_arch],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": int(meta(f"{arch}.attention.key_length", hidden // num_heads)),
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    scaling_type = meta(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        config["rope_scaling"] = {"type": scaling_type, "factor": float(meta(f"{arch}.rope.scaling.factor", 1.0))}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
    _convert_tokenizer(gguf_path, out_dir)


def _convert_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tok.save_pretrained(str(out_dir))


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.kind.weight|bias
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file")


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: rows go from interleaved (x0,y0,x1,y1..) to rotate-half (x.., y..)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
