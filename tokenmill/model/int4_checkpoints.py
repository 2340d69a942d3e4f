"""4-bit GPTQ and AWQ checkpoints read straight into the int4 path: never a float copy of the model.

An HF directory whose ``config.json`` (or ``quantize_config.json``) names ``quant_method`` "gptq" or "awq" stores each
linear layer as integer tensors beside its name; ``iter_int4_checkpoint`` yields them as ``Int4Groups`` (model/quant.py:
``w = (q - 8) * scale + zero`` in groups of 32 along K), which ``Int4Weight`` packs as it packs a GGUF file's Q4 blocks.

Layouts (K = in_features, N = out_features, G = K / group_size; 8 codes per int32, code i in bits 4i..4i+3):
- GPTQ: ``qweight`` [K/8, N] int32 packed along K; ``qzeros`` [G, N/8] int32 packed along N; ``scales`` [G, N]
  float16; ``g_idx`` [K] int32, the group of each input channel. ``w[n, k] = (q[k, n] - z[g_idx[k], n]) *
  s[g_idx[k], n]``. The classic format (``checkpoint_format`` "gptq", AutoGPTQ's) stores ``z - 1``; "gptq_v2" stores z.
- AWQ (``version`` "gemm"): ``qweight`` [K, N/8] and ``qzeros`` [G, N/8] packed along N in AWQ's interleaved order
  (column c of each 8 in code ``[0, 4, 1, 5, 2, 6, 3, 7][c]``), ``scales`` [G, N]; groups are contiguous.

Mapping: ``(q - z) * s = (q - 8) * s + (8 - z) * s``, so Int4Groups' scale is s and its zero ``(8 - z) * s``; a group of
64 or 128 becomes 2 or 4 groups of 32 with the same scale and zero (exact). Act-order (``desc_act``: GPTQ's g_idx not
sorted) puts a group's channels anywhere along K: the columns are reordered so each group is contiguous
(``perm = argsort(g_idx)``) and the layer permutes its input the same way at run time (``Int4Groups.perm``). Layers
fused from several checkpoint tensors (q|k|v, gate|up) share one input, so they must share one permutation (GPTQ
orders channels by the input's Hessian, the same for all of them); a file where they differ is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from tokenmill.model.quant import INT4_GROUP_SIZE, Int4Groups

METHODS = ("gptq", "awq")
_AWQ_COLUMN_CODE = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ's packing: column c of 8 sits in code _AWQ_COLUMN_CODE[c]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # code i of an int32 in bits 4i..4i+3


class Int4CheckpointError(ValueError):
    pass


def quantization_config(hf_dir: Path) -> dict | None:
    """The checkpoint's GPTQ/AWQ settings ({"method", "group_size", "desc_act", "zero_offset"}), or None for an
    unquantized checkpoint. Raises Int4CheckpointError for a quantized format tokenmill does not read."""
    cfg = json.loads((hf_dir / "config.json").read_text()).get("quantization_config")
    if cfg is None and (hf_dir / "quantize_config.json").is_file():  # AutoGPTQ's older file
        cfg = {"quant_method": "gptq", **json.loads((hf_dir / "quantize_config.json").read_text())}
    if not cfg:
        return None
    method = str(cfg.get("quant_method", "")).lower()
    if method not in METHODS:
        raise Int4CheckpointError(f"checkpoint quantization {method!r} is not supported; tokenmill reads 4-bit "
                                  f"{' and '.join(m.upper() for m in METHODS)} checkpoints (or float ones)")
    bits = cfg.get("bits", cfg.get("w_bit", 4))
    if bits != 4:
        raise Int4CheckpointError(f"{method.upper()} checkpoint with bits={bits}: tokenmill reads 4-bit ones only")
    group = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
    if group != -1 and (group <= 0 or group % INT4_GROUP_SIZE):
        raise Int4CheckpointError(f"{method.upper()} group_size={group}: tokenmill reads group sizes that are "
                                  f"multiples of {INT4_GROUP_SIZE} (32, 64, 128, ...) or -1 (one group per row)")
    if method == "awq":
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise Int4CheckpointError(f"AWQ version {version!r} is not supported; tokenmill reads the 'gemm' layout")
        if not cfg.get("zero_point", True):
            raise Int4CheckpointError("AWQ without zero points is not supported")
    fmt = str(cfg.get("checkpoint_format", "gptq")).lower()
    return {"method": method, "group_size": group, "desc_act": bool(cfg.get("desc_act", False)),
            "zero_offset": 1 if method == "gptq" and fmt != "gptq_v2" else 0}


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 packed along the rows -> [8R, C] codes 0..15 (row 8r + i is code i of row r): GPTQ's qweight."""
    codes = (packed[:, None, :] >> _SHIFTS[None, :, None]) & 0xF  # [R, 8, C]
    return codes.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_columns(packed: torch.Tensor, awq: bool) -> torch.Tensor:
    """[R, C] int32 packed along the columns -> [R, 8C] codes 0..15 (column 8c + j is code j of column c; in AWQ's
    order code ``_AWQ_COLUMN_CODE[j]``)."""
    codes = (packed[:, :, None] >> _SHIFTS[None, None, :]) & 0xF  # [R, C, 8]
    if awq:
        codes = codes[:, :, list(_AWQ_COLUMN_CODE)]
    return codes.reshape(packed.shape[0], -1).to(torch.uint8)


def to_groups(name: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              g_idx: torch.Tensor | None, settings: dict) -> Int4Groups:
    """One layer's checkpoint tensors -> Int4Groups [N, K] (with ``perm`` when its groups are not contiguous)."""
    awq = settings["method"] == "awq"
    for t, what in ((qweight, "qweight"), (qzeros, "qzeros")):
        if t.dtype != torch.int32 or t.dim() != 2:
            raise Int4CheckpointError(f"{name}.{what} must be a 2-D int32 tensor, got {t.dtype} {tuple(t.shape)}")
    q = unpack_columns(qweight, True) if awq else unpack_rows(qweight)  # [K, N]
    k, n = q.shape
    z = unpack_columns(qzeros, awq).to(torch.int32) + settings["zero_offset"]  # [G, N]
    group = k if settings["group_size"] == -1 else settings["group_size"]
    g = k // group if k % group == 0 else -1
    if g < 1 or tuple(scales.shape) != (g, n) or tuple(z.shape) != (g, n):
        raise Int4CheckpointError(f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                                  f"{tuple(scales.shape)} do not fit one {k} x {n} weight in groups of {group}")
    if k % INT4_GROUP_SIZE:
        raise Int4CheckpointError(f"{name}: in_features {k} is not a multiple of {INT4_GROUP_SIZE}")
    s = scales.float()
    perm = None
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if tuple(g_idx.shape) != (k,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= g:
            raise Int4CheckpointError(f"{name}.g_idx must hold {k} group numbers in 0..{g - 1}")
        if torch.bincount(g_idx, minlength=g).ne(group).any():
            raise Int4CheckpointError(f"{name}.g_idx: every group must hold {group} input channels")
        if not bool((g_idx[1:] >= g_idx[:-1]).all()):  # act-order: make each group's channels contiguous
            perm = torch.argsort(g_idx, stable=True)
            q = q.index_select(0, perm)
        elif not torch.equal(g_idx, torch.arange(k) // group):
            raise Int4CheckpointError(f"{name}.g_idx is sorted but not in groups of {group}")
    per32 = group // INT4_GROUP_SIZE  # groups of 32 per checkpoint group
    scale32 = s.t().repeat_interleave(per32, dim=1).contiguous()  # [N, K / 32]
    zero32 = ((8 - z).float() * s).t().repeat_interleave(per32, dim=1).contiguous()
    return Int4Groups(q.t().contiguous(), scale32, zero32, perm)


def iter_int4_checkpoint(files: list[Path], settings: dict) -> Iterator[tuple[str, torch.Tensor | Int4Groups]]:
    """(HF name, tensor) for every tensor of the safetensors ``files``: each quantized layer's qweight / qzeros /
    scales / g_idx as one ``<layer>.weight`` Int4Groups, everything else (norms, embeddings, biases, an unquantized
    LM head) as it is. A layer is read when its qweight is met; its other tensors may sit in any file."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in files]
    where = {key: h for h in handles for key in h.keys()}
    parts = (".qweight", ".qzeros", ".scales", ".g_idx")  # a layer's tensors: <layer><part>
    for key, h in where.items():
        if key.endswith(".qweight"):
            layer = key.removesuffix(".qweight")
            missing = [p[1:] for p in parts[:3] if layer + p not in where]
            if missing:
                raise Int4CheckpointError(f"{settings['method'].upper()} layer {layer!r} lacks {', '.join(missing)}")
            g_idx = where[layer + ".g_idx"].get_tensor(layer + ".g_idx") if layer + ".g_idx" in where else None
            tensors = [where[layer + p].get_tensor(layer + p) for p in parts[:3]]
            yield layer + ".weight", to_groups(layer, *tensors, g_idx if settings["method"] == "gptq" else None,
                                               settings)
        elif key.endswith(parts[1:]):
            if key.rsplit(".", 1)[0] + ".qweight" not in where:
                raise Int4CheckpointError(f"{key!r} has no qweight beside it")
        else:
            yield key, h.get_tensor(key)
