"""Quantized weights for the linear layers: what every format shares. The formats live beside it: ``w8a8``
(``model/w8a8.py``: int8 weights and int8 activations), ``int8`` / ``int4`` weight-only (``model/weight_only.py``),
``fp8`` (``model/fp8.py``); ``make_quantized_weight`` builds one by name.

Here: ``QuantizedWeight`` (the layer protocol: ``load_rows``, ``finalize``, ``init_dummy``, ``forward``), the groups
a weight may arrive in already quantized (``Int4Groups``: GGUF Q4 blocks, GPTQ/AWQ layers; ``Int8Groups``: GGUF
Q8_0) and the quantizers that make them from float rows.

Loading is row by row, because the model fuses checkpoint tensors (q/k/v, gate/up) into one weight: ``load_rows``
quantizes each shard as it arrives (one float tensor at a time, never the whole model) and ``finalize`` packs the
weight once every row is in. Per-channel and per-group scales make rows independent, so quantizing a shard alone
equals quantizing the fused weight.

Which layers stay in float: the token embeddings (a gather, not a GEMM) always; the LM head except in w8a8
(``model/llama.py``; measured in BENCHMARKS.md "Quantization").
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import nn

INT4_GROUP_SIZE = 32  # GGUF's block size: Q4_0 / Q4_1 / Q4_K sub-blocks map onto groups one to one
INT8_GROUP_SIZE = 32  # GGUF Q8_0's block size


@dataclass
class Int4Groups:
    """A weight already in 4-bit groups (a GGUF Q4 tensor, a GPTQ/AWQ layer): ``w[n, k] = (q[n, k] - 8) *
    scale[n, g] + zero[n, g]`` with ``g = k // INT4_GROUP_SIZE``. With ``perm`` (GPTQ's act-order) the columns are
    the input channels in that order: column j holds input channel ``perm[j]`` (the layer permutes its input so)."""

    q: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K // 32] float32
    zero: torch.Tensor  # [N, K // 32] float32
    perm: torch.Tensor | None = None  # [K] int64, a permutation of 0..K-1

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:  # [N, K] float32, columns in input-channel order
        g = INT4_GROUP_SIZE
        w = (self.q.float() - 8) * self.scale.repeat_interleave(g, 1) + self.zero.repeat_interleave(g, 1)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out


@dataclass
class Int8Groups:
    """A weight in int8 groups along K: ``w[n, k] = q[n, k] * scale[n, g] + offset[n, g]`` with ``g = k // 32``, the
    scales and offsets values of float16. A GGUF Q8_0 tensor is the case ``offset = None`` (zero)."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // 32] float32
    offset: torch.Tensor | None = None  # [N, K // 32] float32; None: zero

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self) -> torch.Tensor:  # [N, K] float32
        w = self.q.float() * self.scale.repeat_interleave(INT8_GROUP_SIZE, 1)
        return w if self.offset is None else w + self.offset.repeat_interleave(INT8_GROUP_SIZE, 1)


def quantize_int8_groups(w: torch.Tensor) -> Int8Groups:
    """Asymmetric int8 in groups of 32 along K: the group's 256 codes span its minimum to its maximum. [N, K] float ->
    Int8Groups with float16 scales and offsets; every weight within half a step, ``scale / 2``, of its value.

    The offset (the value of code 0, about the group's midpoint) is rounded to float16 first, and the scale is then
    the smallest float16 whose codes -128..127 still reach both ends of the group from that offset, so rounding the
    two never pushes a weight past the codes. (Against symmetric absmax codes, Q8_0's form, the step is up to 2x
    finer where a group's values are lopsided: BENCHMARKS.md "int8 in asymmetric groups".)"""
    n, k = w.shape
    if k % INT8_GROUP_SIZE:
        raise ValueError(f"int8 needs the input dimension to be a multiple of {INT8_GROUP_SIZE}, got {k}")
    g = w.float().reshape(n, k // INT8_GROUP_SIZE, INT8_GROUP_SIZE)
    lo, hi = g.amin(dim=2), g.amax(dim=2)  # [N, G]
    offset = (lo + 128 * ((hi - lo) / 255)).to(torch.float16).float()
    need = torch.maximum((hi - offset) / 127, (offset - lo) / 128)  # the smallest step that reaches both ends
    scale = need.to(torch.float16)
    scale = torch.where(scale.float() < need, torch.nextafter(scale, torch.full_like(scale, float("inf"))),
                        scale).float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((g - offset[..., None]) * inv[..., None]).clamp_(-128, 127).to(torch.int8).reshape(n, k)
    return Int8Groups(q, scale, offset)


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``w ~ q * scale[:, None]``, |q| <= 127. [N, K] -> ([N, K] int8, [N] float32)."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4_groups(w: torch.Tensor, group: int = INT4_GROUP_SIZE) -> Int4Groups:
    """Asymmetric min/max 4-bit groups along K. [N, K] float -> Int4Groups. The error is at most half a step,
    ``(max - min) / 30`` per group."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input dimension to be a multiple of {group}, got {k}")
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(dim=2), g.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(n, k)
    return Int4Groups(q, scale, lo + 8 * scale)


class QuantizedWeight(nn.Module, abc.ABC):
    """One linear layer's weight in a quantized format: ``load_rows`` then ``finalize`` once, then ``forward``.
    ``kernels`` is the C++ module (``ops.kernels``) or None: the torch paths then. ``amx``: the ops object chose the
    AMX kernels (``ops.amx``), which the formats that have one use."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.kernels = kernels
        self.amx = amx and kernels is not None

    @abc.abstractmethod
    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        """Rows ``offset:offset + len(w)`` from a float tensor (or 4- / 8-bit groups) of shape [rows, in_features]."""

    @abc.abstractmethod
    def finalize(self, dtype: torch.dtype) -> None:
        """Called once every row is loaded; ``dtype`` is the activations' dtype."""

    @abc.abstractmethod
    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        """Random weights straight in the stored format (``load_format="dummy"``), finalized."""

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """[..., in] -> [..., out] (+ bias) (+ residual [..., out])."""


def to_float(w: torch.Tensor | Int4Groups | Int8Groups) -> torch.Tensor:
    return w.dequantize() if isinstance(w, (Int4Groups, Int8Groups)) else w


def as_dtype(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype).contiguous()


def add_bias_residual(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y += bias
    if residual is not None:
        y += residual.reshape(y.shape)
    return y


def make_quantized_weight(quantization: str, out_features: int, in_features: int, kernels=None,
                          amx: bool = False, device: torch.device | None = None) -> QuantizedWeight:
    """``kernels``: the C++ module, or None for the torch paths; ``amx``: use its AMX kernels where a format has one
    (int8 weight-only's GEMM); ``device``: where ``fp8`` (model/fp8.py, the one format that runs on CUDA) lives."""
    if quantization == "fp8":
        from tokenmill.model.fp8 import FP8Weight

        return FP8Weight(out_features, in_features, kernels, amx, device)
    if quantization == "w8a8":
        from tokenmill.model.w8a8 import W8A8Weight

        return W8A8Weight(out_features, in_features, kernels, amx)
    from tokenmill.model.weight_only import Int4Weight, Int8Weight

    return {"int8": Int8Weight, "int4": Int4Weight}[quantization](out_features, in_features, kernels, amx)
