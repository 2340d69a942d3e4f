"""Helpers shared by the models' ``load_weights``: find where a checkpoint tensor goes, copy with a shape check,
check that every weight was loaded, and random weights (``load_format="dummy"``)."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from tokenmill.model.layers import Linear
from tokenmill.model.quant import Int4Groups


def lookup_param(params: dict[str, nn.Parameter], name: str, hf_name: str) -> nn.Parameter:
    if name not in params:
        raise ValueError(f"checkpoint weight {hf_name!r} has no place in the model")
    return params[name]


def copy_weight(dst: torch.Tensor, src: torch.Tensor | Int4Groups, hf_name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {hf_name!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src.dequantize() if isinstance(src, Int4Groups) else src)


def place(params: dict[str, nn.Parameter], linears: dict[str, Linear], name: str, tensor: torch.Tensor | Int4Groups,
          hf_name: str, offset: int = 0, rows: int | None = None) -> None:
    """Puts checkpoint tensor ``hf_name`` at rows ``offset:offset + rows`` of our weight or bias ``name`` (the whole
    of it when ``rows`` is None), checking its shape. A linear layer whose last rows these are is finalized by the
    caller (``WeightPlacer`` does it)."""
    layer = linears.get(name)
    if layer is None:
        dst = lookup_param(params, name, hf_name).data
        copy_weight(dst if rows is None else dst[offset:offset + rows], tensor, hf_name)
        return
    rows = layer.out_features if rows is None else rows
    if tuple(tensor.shape) != (rows, layer.in_features):
        raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {(rows, layer.in_features)}")
    layer.load_rows(offset, tensor, hf_name)


class WeightPlacer:
    """One ``load_weights`` call: puts checkpoint tensors in place (``place``), finalizes each linear layer as soon as
    all its shards are in (a fused layer gets ``num_shards`` of them), and records what was loaded for ``check``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.linears = linear_weights(model)
        self.loaded: set[str] = set()
        self._shards: dict[str, set[int]] = {}

    def put(self, name: str, tensor: torch.Tensor | Int4Groups, hf_name: str, shard: int = 0, num_shards: int = 1,
            offset: int = 0, rows: int | None = None) -> None:
        place(self.params, self.linears, name, tensor, hf_name, offset, rows)
        seen = self._shards.setdefault(name, set())
        seen.add(shard)
        if len(seen) == num_shards:
            self.loaded.add(name)
            if name in self.linears:
                self.linears[name].finalize()

    def check(self) -> None:
        check_all_loaded(self.model, self.loaded)


def linear_weights(model: nn.Module) -> dict[str, Linear]:
    """"<module path>.weight" -> its Linear, for every linear layer (float or quantized)."""
    return {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, Linear)}


def check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    expected = set(dict(model.named_parameters())) | set(linear_weights(model))
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the checkpoint's sizes, for speed and memory measurements at shapes no checkpoint here has:
    linear layers uniform in +-1e-3 (or random codes of that size), norms 1, embeddings N(0, 1)."""
    device = next(itertools.chain(model.parameters(), model.buffers())).device  # a quantized MLP has buffers only
    g = torch.Generator(device=device).manual_seed(seed)  # a generator must live on the tensors' device (CUDA)
    linears = linear_weights(model)
    for m in linears.values():
        m.init_dummy(g)
    skip = {id(m.bias) for m in linears.values() if m.bias is not None}
    for name, p in model.named_parameters():
        if id(p) in skip or (name.endswith(".weight") and name in linears):
            continue
        if "norm" in name and name.endswith(".weight"):
            p.data.fill_(1.0)
        elif name.endswith(".bias"):
            p.data.zero_()
        else:
            p.data.normal_(generator=g)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held (quantized weights packed; the RoPE tables included)."""
    return sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
