"""A GGUF file's tensors, one at a time, under HF names and in HF layout.

``iter_gguf_weights`` reads the memory-mapped file tensor by tensor: each is dequantized to float32 on its own, or,
with ``groups="int4"``, a Q4_0 / Q4_1 / Q4_K matrix is unpacked into ``Int4Groups`` (4-bit codes plus a scale
and a zero per 32 weights) with no rounding at all, since those blocks are exactly ``(q - 8) * scale + zero``; with
``groups="int8"`` a Q8_0 matrix (34 bytes per 32: f16 d, 32 int8 codes; w = d * q) into ``Int8Groups``:

- Q4_0 (18 bytes per 32): f16 d, 16 bytes of nibbles; w = d * (q - 8), so scale = d, zero = 0.
- Q4_1 (20 bytes per 32): f16 d, f16 m, nibbles; w = d * q + m, so scale = d, zero = m + 8 d.
- Q4_K (144 bytes per 256): f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes
  of nibbles; w = d * sc * q - dmin * mn, so scale = d * sc, zero = 8 d sc - dmin mn.

In Q4_0 / Q4_1 a block's element j is the low nibble of byte j and element j + 16 its high nibble; in Q4_K each 32
bytes hold two sub-blocks, the low nibbles first. Nothing holds more than one tensor's float copy, so a quantized
model loads in about its file's size.

llama.cpp stores the Q and K projections of Llama-architecture models with rows permuted for its interleaved RoPE;
``_unpermute_qk`` undoes that (for Int4Groups and Int8Groups too: it moves whole rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.model.quant import Int4Groups, Int8Groups

# GGUF general.architecture -> (HF architecture, whether Q/K rows are permuted by llama.cpp's converter)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", False),
    "olmoe": ("OlmoeForCausalLM", False),  # NeoX RoPE in llama.cpp: rows as HF has them; q/k norms over all heads
    "gemma2": ("Gemma2ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
}
# Gemma's names where they differ from the table below (it has four norms a layer), and its norms: llama.cpp's
# converter stores Gemma's RMSNorm weights as 1 + w (the HF checkpoint's w), so 1 comes off here
_GEMMA_NAMES = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
# "llama" with an expert count is Mixtral; its experts' tensors are stacked [experts, rows, cols]
_MOE_OF = {"llama": "MixtralForCausalLM"}
_EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}

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
    "ffn_gate_inp": "mlp.gate",  # a MoE layer's router
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass(frozen=True)
class GGUFModel:
    """The parts of a GGUF file's metadata that decide how its tensors map onto the HF model."""

    reader: object  # gguf.GGUFReader
    arch: str
    hf_arch: str
    permuted: bool  # Q/K rows in llama.cpp's interleaved-RoPE order
    num_heads: int
    num_kv_heads: int

    def meta(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()


def open_gguf(path: Path) -> GGUFModel:
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    arch = None if field is None else field.contents()
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; tokenmill supports {', '.join(sorted(GGUF_ARCHITECTURES))}"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise ValueError("GGUF files with a rope_freqs tensor (llama3 RoPE scaling) are not supported yet")
    hf_arch, permuted = GGUF_ARCHITECTURES[arch]
    experts = reader.fields.get(f"{arch}.expert_count")
    if experts is not None and int(experts.contents()) > 0 and arch in _MOE_OF:
        hf_arch = _MOE_OF[arch]
    heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    kv_field = reader.fields.get(f"{arch}.attention.head_count_kv")
    return GGUFModel(reader, arch, hf_arch, permuted, heads, heads if kv_field is None else int(kv_field.contents()))


def iter_gguf_weights(model: GGUFModel, groups: str | None = None
                      ) -> Iterator[tuple[str, torch.Tensor | Int4Groups | Int8Groups]]:
    """(HF name, tensor) for every tensor: float32 tensors, or, for the linear weights, Int4Groups of the Q4 ones when
    ``groups == "int4"`` and Int8Groups of the Q8_0 ones when ``groups == "int8"`` (the token embeddings are always
    dequantized: they are looked up, not multiplied)."""
    import gguf

    for t in model.reader.tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[2] in _EXPERT_NAMES:  # stacked experts: one tensor each
            yield from _iter_experts(model, t, parts, groups)
            continue
        gemma = model.arch.startswith("gemma")
        hf_name = hf_name_of(t.name, gemma)
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists dims fastest-first
        if t.name.endswith("ffn_gate_inp_shexp.weight") and len(shape) == 1:
            shape = [1, shape[0]]  # the shared expert's gate: one output
        kind = t.tensor_type.name
        matrix = len(shape) == 2 and t.name != "token_embd.weight"
        w: torch.Tensor | Int4Groups | Int8Groups
        if matrix and groups == "int4" and kind in _UNPACK:
            w = unpack_int4(np.asarray(t.data), kind, shape)
        elif matrix and groups == "int8" and kind == "Q8_0":
            w = unpack_q8_0(np.asarray(t.data), shape)
        else:
            arr = gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
            w = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # F32 tensors: read-only views of the file
        if gemma and t.name.endswith("norm.weight"):
            w = w - 1.0
        if model.permuted and t.name.endswith("attn_q.weight"):
            w = _unpermute(w, model.num_heads)
        elif model.permuted and t.name.endswith("attn_k.weight"):
            w = _unpermute(w, model.num_kv_heads)
        yield hf_name, w


def _iter_experts(model: GGUFModel, t, parts: list[str], groups: str | None):
    """A stacked [experts, N, K] tensor (``blk.L.ffn_{gate,up,down}_exps``) as each expert's [N, K] weight, under
    ``model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight``; quantized blocks split per expert as they are."""
    import gguf

    e, n, k = (int(d) for d in reversed(t.shape))
    kind = t.tensor_type.name
    raw = np.asarray(t.data)
    for i in range(e):
        name = f"model.layers.{parts[1]}.mlp.experts.{i}.{_EXPERT_NAMES[parts[2]]}.{parts[3]}"
        if groups == "int4" and kind in _UNPACK:
            yield name, unpack_int4(raw.reshape(e, -1)[i], kind, [n, k])
        elif groups == "int8" and kind == "Q8_0":
            yield name, unpack_q8_0(raw.reshape(e, -1)[i], [n, k])
        else:
            arr = gguf.dequantize(raw.reshape(e, -1)[i], t.tensor_type).astype(np.float32, copy=False)
            yield name, torch.from_numpy(np.array(arr.reshape(n, k)))


def hf_name_of(gguf_name: str, gemma: bool = False) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.kind.weight|bias
    if len(parts) == 4 and parts[0] == "blk" and gemma and parts[2] in _GEMMA_NAMES:
        return f"model.layers.{parts[1]}.{_GEMMA_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF file")


# ------------------------------------------------------------------ 4-bit blocks -> Int4Groups
def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32 (little-endian f16)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _unpack_q4_0(blocks: np.ndarray):  # [N, G, 18]
    d = _f16(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:]), d, np.zeros_like(d)


def _unpack_q4_1(blocks: np.ndarray):  # [N, G, 20]
    d, m = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    return _nibbles(blocks[..., 4:]), d, m + 8 * d


def _unpack_q4_k(blocks: np.ndarray):  # [N, B, 144] -> codes [N, B * 8, 32], scale / zero [N, B * 8]
    n, b = blocks.shape[:2]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # [N, B]
    s = blocks[..., 4:16].astype(np.uint16)  # [N, B, 12]: 6-bit scales and mins of 8 sub-blocks
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    qs = blocks[..., 16:].reshape(n, b, 4, 32)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(n, b * 8, 32)  # chunk i: sub-blocks 2i (low), 2i+1
    scale = d[..., None] * sc.astype(np.float32)  # [N, B, 8]
    zero = 8 * scale - dmin[..., None] * mn.astype(np.float32)
    return codes, scale.reshape(n, b * 8), zero.reshape(n, b * 8)


_UNPACK = {"Q4_0": (32, 18, _unpack_q4_0), "Q4_1": (32, 20, _unpack_q4_1), "Q4_K": (256, 144, _unpack_q4_k)}


def unpack_int4(data: np.ndarray, type_name: str, shape: list[int]) -> Int4Groups:
    """A Q4_0 / Q4_1 / Q4_K matrix's raw bytes ([N, bytes per row]) -> Int4Groups of shape ``shape`` = [N, K]."""
    n, k = shape
    block, nbytes, unpack = _UNPACK[type_name]
    codes, scale, zero = unpack(data.reshape(n, k // block, nbytes))
    return Int4Groups(torch.from_numpy(np.ascontiguousarray(codes.reshape(n, k), dtype=np.uint8)),
                      torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
                      torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)))


def unpack_q8_0(data: np.ndarray, shape: list[int]) -> Int8Groups:
    """A Q8_0 matrix's raw bytes ([N, bytes per row]) -> Int8Groups of shape ``shape`` = [N, K]."""
    n, k = shape
    blocks = data.reshape(n, k // 32, 34)
    codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)
    return Int8Groups(torch.from_numpy(codes), torch.from_numpy(np.ascontiguousarray(_f16(blocks[..., 0:2]))))


def _unpermute(w: torch.Tensor | Int4Groups | Int8Groups, n_head: int) -> torch.Tensor | Int4Groups | Int8Groups:
    if isinstance(w, (Int4Groups, Int8Groups)):
        parts = (w.q, w.scale, w.zero) if isinstance(w, Int4Groups) else (w.q, w.scale)
        return type(w)(*(torch.from_numpy(_unpermute_qk(a.numpy(), n_head)) for a in parts))
    return torch.from_numpy(_unpermute_qk(w.numpy(), n_head))


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute``: rows go from interleaved (x0,y0,x1,y1..) to rotate-half (x.., y..)."""
    rows = w.shape[0]
    return np.ascontiguousarray(w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
