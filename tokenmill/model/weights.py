"""Helpers shared by the models' ``load_weights``: find our parameter for a checkpoint name, copy with a shape check."""

from __future__ import annotations

import torch
from torch import nn


def lookup_param(params: dict[str, nn.Parameter], name: str, hf_name: str) -> nn.Parameter:
    if name not in params:
        raise ValueError(f"checkpoint weight {hf_name!r} has no place in the model")
    return params[name]


def copy_weight(dst: torch.Tensor, src: torch.Tensor, hf_name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {hf_name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def check_all_loaded(params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
