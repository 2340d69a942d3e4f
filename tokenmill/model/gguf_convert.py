"""GGUF file -> HF model directory (config.json, tokenizer files, and for float models model.safetensors), cached.

Converting a GGUF file's tokenizer takes seconds, and dequantising its weights more; doing it once and loading the
cached directory afterwards keeps a cold start well under the 5 s target. The cache key is the file's resolved path,
size and modification time plus ``CONVERTER_VERSION``, so a changed file is converted again.

The weights are written only when a float model needs them (``with_weights``): a quantized model reads the GGUF
file's tensors directly (``model/gguf_weights.py``), so no float copy of a big model is ever written or held.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenmill.model.gguf_weights import GGUFModel, iter_gguf_weights, open_gguf

CONVERTER_VERSION = 4  # 2: mixture-of-experts keys; 3: Gemma; 4: OLMoE's clip_qkv


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokenmill"


def cached_hf_dir(gguf_path: Path, cache_dir: Path | None = None, with_weights: bool = False) -> Path:
    """The converted HF directory for ``gguf_path`` (config and tokenizer; and model.safetensors when
    ``with_weights``), converting first what the cache lacks."""
    gguf_path = gguf_path.resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}|v{CONVERTER_VERSION}".encode()).hexdigest()[:16]
    root = (cache_dir or default_cache_dir()) / "gguf"
    target = root / f"{gguf_path.stem}-{key}"
    if not (target / "config.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=root))
        try:
            write_config(open_gguf(gguf_path), tmp)
            _convert_tokenizer(gguf_path, tmp)
            try:
                os.replace(tmp, target)
            except OSError:  # another process won the race; its copy is as good as ours
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if with_weights and not (target / "model.safetensors").exists():
        from safetensors.torch import save_file

        tmp_file = target / f".model.{os.getpid()}.safetensors"
        try:
            state = dict(iter_gguf_weights(open_gguf(gguf_path)))
            save_file(state, str(tmp_file), metadata={"format": "pt", "source": gguf_path.name})
            os.replace(tmp_file, target / "model.safetensors")
        finally:
            tmp_file.unlink(missing_ok=True)
    return target


def write_config(model: GGUFModel, out_dir: Path) -> None:
    """config.json from the GGUF metadata."""
    arch, meta = model.arch, model.meta
    hidden = int(meta(f"{arch}.embedding_length"))
    tensors = {t.name: t for t in model.reader.tensors}
    vocab_size = int(meta(f"{arch}.vocab_size", 0)) or int(tensors["token_embd.weight"].shape[-1])
    config = {
        "architectures": [model.hf_arch],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(meta(f"{arch}.feed_forward_length", 0) or meta(f"{arch}.expert_feed_forward_length")),
        "num_hidden_layers": int(meta(f"{arch}.block_count")),
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": int(meta(f"{arch}.attention.key_length", hidden // model.num_heads)),
        "rms_norm_eps": float(meta(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta(f"{arch}.context_length", 2048)),
        "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    experts = int(meta(f"{arch}.expert_count", 0) or 0)
    if experts:  # a mixture of experts (ModelConfig reads these keys as transformers writes them)
        config["num_local_experts"] = config["num_experts"] = experts
        config["num_experts_per_tok"] = int(meta(f"{arch}.expert_used_count", 2))
        expert_ffn = meta(f"{arch}.expert_feed_forward_length")
        if expert_ffn:
            config["moe_intermediate_size"] = int(expert_ffn)
        shared = meta(f"{arch}.expert_shared_feed_forward_length")
        if shared:
            config["shared_expert_intermediate_size"] = int(shared)
        norm = meta(f"{arch}.expert_weights_norm")
        config["norm_topk_prob"] = bool(norm) if norm is not None else arch == "qwen3moe"
    clamp = meta(f"{arch}.attention.clamp_kqv")
    if clamp:  # OLMoE's clip_qkv
        config["clip_qkv"] = float(clamp)
    if arch.startswith("gemma"):
        _gemma_config(config, model, arch)
    scaling_type = meta(f"{arch}.rope.scaling.type")
    if scaling_type and scaling_type != "none":
        config["rope_scaling"] = {"type": scaling_type, "factor": float(meta(f"{arch}.rope.scaling.factor", 1.0))}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def _gemma_config(config: dict, model: GGUFModel, arch: str) -> None:
    """Gemma's keys, as llama.cpp reads them: the softcaps, the window and its layer pattern (Gemma 2 alternates,
    Gemma 3 has every 6th layer global, its sliding layers' RoPE at theta 10,000), and the attention scale, which
    llama.cpp derives from the model's size: 1 / sqrt(hidden / heads) for the 27B models (Gemma 2: 46 layers,
    Gemma 3: 62), else 1 / sqrt(head_dim)."""
    meta = model.meta
    config["hidden_activation"] = "gelu_pytorch_tanh"
    config["tie_word_embeddings"] = True
    for key, name in (("attn_logit_softcapping", "attn_logit_softcapping"),
                      ("final_logit_softcapping", "final_logit_softcapping")):
        value = meta(f"{arch}.{key}")
        config[name] = float(value) if value is not None else None
    window = meta(f"{arch}.attention.sliding_window")
    config["sliding_window"] = int(window) if window else None
    layers, pattern = config["num_hidden_layers"], 2 if arch == "gemma2" else 6
    config["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    big = layers == (46 if arch == "gemma2" else 62)
    config["query_pre_attn_scalar"] = (config["hidden_size"] // config["num_attention_heads"] if big
                                       else config["head_dim"])
    if arch == "gemma3":
        config["rope_local_base_freq"] = 10000.0


def _convert_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    """transformers' GGUF tokenizer conversion, which refuses an architecture it has no model mapping for (OLMoE)
    even though the tokenizer is plain metadata: then it reads a stand-in file holding only the tokenizer's fields
    under architecture "llama"."""
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = open_gguf(gguf_path).arch
    if arch in GGUF_SUPPORTED_ARCHITECTURES or arch.replace("moe", "_moe") in GGUF_SUPPORTED_ARCHITECTURES:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    else:
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            _tokenizer_only_gguf(gguf_path, Path(tmp) / "tokenizer.gguf")
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file="tokenizer.gguf")
    tok.save_pretrained(str(out_dir))


def copy_tokenizer_fields(reader, writer) -> None:
    """Every ``tokenizer.*`` field of a GGUFReader's file into a GGUFWriter, as it is."""
    import gguf

    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)


def _tokenizer_only_gguf(src: Path, dst: Path) -> None:
    """A GGUF file with ``src``'s ``tokenizer.*`` fields, no tensors, architecture "llama"."""
    import gguf

    w = gguf.GGUFWriter(str(dst), "llama")
    copy_tokenizer_fields(gguf.GGUFReader(str(src)), w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
