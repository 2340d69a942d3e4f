"""How token states become one vector per text: pooling modes, normalisation and truncation, read from the model's
sentence-transformers config when it has one (``modules.json``, ``1_Pooling/config.json``,
``sentence_bert_config.json``), else the usual defaults (mean pooling for encoders, last-token for decoders).

Pooling runs on the flat packed batch: ``hidden`` [num_tokens, hidden] and ``seq_lens``; several modes concatenate
in sentence-transformers' order (cls, max, mean, mean_sqrt_len, last).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenmill.model.model_config import UnsupportedModelError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len", "last")  # in concatenation order
_ST_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
            "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len", "pooling_mode_lasttoken": "last"}
_ST_MODULES = ("sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
               "sentence_transformers.models.Normalize")


@dataclass(frozen=True)
class PoolingConfig:
    modes: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None  # truncate longer texts to this many tokens (special tokens included)
    do_lower_case: bool = False
    source: str = "default"  # "sentence-transformers" when read from the model's files

    def describe(self) -> str:
        return f"{'+'.join(self.modes)} pooling{', normalized' if self.normalize else ''}"

    def with_overrides(self, pooling: str | None = None, normalize: bool | None = None) -> "PoolingConfig":
        cfg = self
        if pooling is not None:
            if pooling not in POOLING_MODES:
                raise ValueError(f"unknown pooling {pooling!r}; known: {', '.join(POOLING_MODES)}")
            cfg = replace(cfg, modes=(pooling,))
        if normalize is not None:
            cfg = replace(cfg, normalize=normalize)
        return cfg


def read_pooling_config(model_dir: Path, is_decoder: bool) -> PoolingConfig:
    modules_file = model_dir / "modules.json"
    if not modules_file.is_file():
        return PoolingConfig(("last",) if is_decoder else ("mean",), normalize=is_decoder, max_seq_length=None)
    modes: tuple[str, ...] = ()
    normalize = False
    st_cfg: dict = {}
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        path = model_dir / module.get("path", "")
        if kind == "sentence_transformers.models.Transformer":
            f = path / "sentence_bert_config.json"
            st_cfg = json.loads(f.read_text()) if f.is_file() else {}
        elif kind == "sentence_transformers.models.Pooling":
            pc = json.loads((path / "config.json").read_text())
            if pc.get("pooling_mode_weightedmean_tokens"):
                raise UnsupportedModelError("weighted-mean pooling is not supported; tokenmill supports "
                                            + ", ".join(POOLING_MODES))
            modes = tuple(m for m in POOLING_MODES if any(pc.get(k) and v == m for k, v in _ST_KEYS.items()))
        elif kind == "sentence_transformers.models.Normalize":
            normalize = True
        else:
            raise UnsupportedModelError(
                f"sentence-transformers module {kind!r} is not supported; tokenmill supports {', '.join(_ST_MODULES)}")
    if not modes:
        modes = ("last",) if is_decoder else ("mean",)
    return PoolingConfig(modes, normalize, st_cfg.get("max_seq_length"), bool(st_cfg.get("do_lower_case", False)),
                         source="sentence-transformers")


def pool(hidden: torch.Tensor, seq_lens: list[int], cfg: PoolingConfig) -> torch.Tensor:
    """[num_tokens, hidden] -> [num_seqs, hidden * len(modes)], float32."""
    h = hidden.float()
    device = h.device
    lens = torch.tensor(seq_lens, device=device)
    ends = torch.cumsum(lens, 0)
    starts = ends - lens
    seg = torch.repeat_interleave(torch.arange(len(seq_lens), device=device), lens)  # [num_tokens]
    parts = []
    sums = None
    for mode in cfg.modes:
        if mode == "cls":
            parts.append(h[starts])
        elif mode == "last":
            parts.append(h[ends - 1])
        elif mode == "max":
            out = torch.full((len(seq_lens), h.shape[1]), float("-inf"), device=device)
            parts.append(out.scatter_reduce_(0, seg[:, None].expand_as(h), h, "amax"))
        else:
            if sums is None:
                sums = torch.zeros(len(seq_lens), h.shape[1], device=device).index_add_(0, seg, h)
            denom = lens if mode == "mean" else lens.float().sqrt()
            parts.append(sums / denom[:, None])
    out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return F.normalize(out, p=2, dim=1) if cfg.normalize else out
