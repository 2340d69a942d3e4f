"""The layers the models are made of: RMSNorm, rotary position embeddings (HF "rotate half" layout), Linear (float or
quantized; with LoRA adapters' updates where model/lora.py attached them), the gated MLP and Embedding, each built
from a ``Build`` (the kernels, dtype and device, passed in: nothing is read from torch's global defaults)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.gemm import ACTIVATIONS, is_packed, is_panels, linear, linear_act, linear_add, pack, unpack
from tokenmill.model.model_config import RopeConfig
from tokenmill.model.quant import Int4Groups, Int8Groups, make_quantized_weight
from tokenmill.model.w8a8 import W8A8Weight
from tokenmill.ops import Ops
from tokenmill.parallel.group import SINGLE, TPGroup


@dataclass(frozen=True)
class Build:
    """What every layer is made with: the kernel family (``tokenmill/ops/``), the activations' dtype (and the
    parameters', unless ``weight_dtype`` says otherwise), the linears' quantization (model/quant.py; "none" for
    float), the tensor-parallel group the model is split over (``tokenmill/parallel/``; one rank by default) and the
    float linears' CPU GEMM path (model/gemm.py: the resolved backend, so each weight is packed once, as it loads).
    The device is the kernels'.

    ``weight_dtype``: where set (bfloat16 under float32 activations: loader.resolve_activation_dtype), the float
    linears' weights and the embeddings are held in it; a linear whose GEMM path cannot read it beside ``dtype``
    activations (anything but panels) gets its weight widened to ``dtype`` when it is packed (the values stay the
    rounded ones). Biases and norms are in ``dtype``."""

    ops: Ops
    dtype: torch.dtype
    quantization: str = "none"
    tp: TPGroup = SINGLE
    weight_dtype: torch.dtype | None = None
    gemm: str = "onednn"

    @property
    def device(self) -> torch.device:
        return self.ops.device

    @property
    def param_dtype(self) -> torch.dtype:
        """The float weights' (linears', embeddings') dtype."""
        return self.weight_dtype or self.dtype

    def with_quantization(self, quantization: str) -> "Build":
        return dataclasses.replace(self, quantization=quantization)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, build: Build) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=build.dtype, device=build.device), requires_grad=False)
        self.eps = eps
        self.ops = build.ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        return self.ops.rms_norm(x, self.weight, self.eps)


def rope_inv_freq(head_dim: int, rope: RopeConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear, llama3 or longrope scaling applied (``long``: LongRoPE's
    long factors, else its short ones)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope.rope_type == "longrope":  # each frequency divided by its factor, in transformers' order of operations
        # (one factor per frequency: ModelConfig.from_hf_dict refuses a config where the count differs)
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)
        return 1.0 / (factors * rope.theta**exponents)
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin for every position; applied to q and k of a flat batch by position (``ops.rope``).

    LongRoPE keeps two tables in one: rows [0, max_positions) with the short factors, rows [max_positions,
    2 * max_positions) with the long ones, both scaled by the attention factor; the step's positions carry
    ``long_offset`` (= max_positions) on the tokens that take the long set (``StepBuffers.fill``), so the lookup
    stays one gather. ``long_offset`` is None for every other RoPE."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig, build: Build) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.rope = head_dim, max_positions, rope
        self.long_offset = max_positions if rope.rope_type == "longrope" else None
        self.ops = build.ops
        self.build(build.device)

    def build(self, device: torch.device | str) -> None:
        """(Re)computes the cos/sin tables on ``device`` in float32."""
        self._cached = None
        with torch.device(device):
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            sets = [False, True] if self.long_offset is not None else [False]
            freqs = torch.cat([torch.outer(positions, rope_inv_freq(self.head_dim, self.rope, long))
                               for long in sets])  # [sets * max_pos, head_dim/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [sets * max_pos, head_dim]
            scale = self.rope.attention_factor
            self.register_buffer("cos", emb.cos() * scale, persistent=False)
            self.register_buffer("sin", emb.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [num_tokens]; q [num_tokens, heads, head_dim]; k [num_tokens, kv_heads, head_dim]."""
        cos, sin = self._cos_sin(positions, q.dtype)  # [num_tokens, head_dim] each
        return self.ops.rope(q, k, cos, sin)

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows for ``positions`` in ``dtype``. Every layer of a forward pass gets the same positions tensor, so
        the gather and cast run once per pass, not once per layer (the tensor is held, so ``is`` is a safe test)."""
        cached = self._cached
        if cached is None or cached[0] is not positions or cached[1] != dtype:
            cos = self.cos[positions].to(dtype)
            sin = self.sin[positions].to(dtype)
            self._cached = cached = (positions, dtype, cos, sin)
        return cached[2], cached[3]


class Linear(nn.Module):
    """y = x W^T (+ b) with uninitialised storage: every weight comes from a checkpoint, so random init is waste.

    With ``quantization`` other than "none" the weight lives in ``self.quantized`` (a QuantizedWeight,
    model/quant.py) and ``self.weight`` is None; the bias stays float. Either way checkpoint tensors arrive through
    ``load_rows`` (a fused layer gets one call per shard) and ``finalize`` runs once, when every row is in (a float
    weight is then packed for its GEMM path, ``gemm_backend``: model/gemm.py).
    Activations are in ``build.dtype``, a float weight in ``build.param_dtype``; ``build.quantization`` picks the
    weight's format, and a quantized weight runs on ``build.ops.kernels`` (the C++ module) where the family has
    them, else on torch's ops.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, build: Build,
                 shard_sizes: tuple[int, ...] | None = None) -> None:
        """``shard_sizes``: a fused layer's output rows per checkpoint tensor, in order (q, k, v / gate, up); the one
        statement of the split that loading, tensor parallel slicing and LoRA read."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shard_sizes = shard_sizes or (out_features,)
        assert sum(self.shard_sizes) == out_features
        self.dtype = build.dtype  # the activations'
        self.ops = build.ops
        self.gemm_backend = build.gemm  # the float path's CPU GEMMs (model/gemm.py; set_gemm_backend switches it)
        factory = dict(dtype=build.dtype, device=build.device)
        if build.quantization == "none":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=build.param_dtype,
                                                   device=build.device), requires_grad=False)
            self.quantized = None
        else:
            self.register_parameter("weight", None)
            self.quantized = make_quantized_weight(build.quantization, out_features, in_features, build.ops.kernels,
                                                   getattr(build.ops, "amx", False), build.device)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        self.lora = None  # LoRA adapters' stacked factors (model/lora.py), added to the output of a step's rows

    def load_rows(self, offset: int, tensor: torch.Tensor | Int4Groups | Int8Groups, name: str) -> None:
        """Rows ``offset:offset + len(tensor)`` of the weight from checkpoint tensor ``name`` ([rows, in])."""
        rows = tensor.shape[0]
        if len(tensor.shape) != 2 or tensor.shape[1] != self.in_features or offset + rows > self.out_features:
            raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected "
                             f"[<= {self.out_features - offset}, {self.in_features}]")
        if self.quantized is None:
            self._plain_weight()[offset:offset + rows].copy_(  # repacked in finalize
                tensor.dequantize() if isinstance(tensor, (Int4Groups, Int8Groups)) else tensor)
        else:
            self.quantized.load_rows(offset, tensor)

    def finalize(self) -> None:
        if self.quantized is not None:
            self.quantized.finalize(self.dtype)
        else:
            self.use_gemm_backend(self.gemm_backend)  # packs the weight for its path

    def use_gemm_backend(self, name: str) -> None:
        """The float path's CPU GEMMs (model/gemm.py): on "onednn" the weight is prepacked, on "panels" in panels (or
        prepacked), on "aten" it is plain. A weight in another dtype than the activations (``Build.weight_dtype``)
        stays so in panels only; elsewhere it is widened to theirs first."""
        self.gemm_backend = name
        if self.quantized is None:
            held = self.weight.data
            if name == "aten":
                w = unpack(held).to(self.dtype)
            elif (name == "onednn" and held.is_mkldnn) or (name == "panels" and is_panels(held)):
                w = held  # already packed for it
            else:
                w = pack(unpack(held), name, self.dtype)
            if w is not held:
                self.weight = nn.Parameter(w, requires_grad=False)

    def _plain_weight(self) -> torch.Tensor:
        """The float weight's storage for writing rows into (unpacked first if it was packed)."""
        if is_packed(self.weight):
            self.weight = nn.Parameter(unpack(self.weight.data), requires_grad=False)
        return self.weight.data

    def dense_weight(self) -> torch.Tensor:
        """The float weight as a plain [out, in] tensor (packed or not)."""
        return unpack(self.weight.detach())

    def init_dummy(self, generator: torch.Generator) -> None:
        """Random weights (``load_format="dummy"``): uniform in +-1e-3, or random codes of that size."""
        if self.quantized is None:
            self._plain_weight().uniform_(-1e-3, 1e-3, generator=generator)
        else:
            self.quantized.init_dummy(generator, self.dtype)
        if self.bias is not None:
            self.bias.data.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[..., in] -> [..., out], plus ``residual`` [..., out] when given (in the GEMM's epilogue on the float
        path and under w8a8)."""
        if self.quantized is None:
            if residual is None:
                y = linear(x, self.weight, self.bias, self.gemm_backend)
            else:
                y = linear_add(x, self.weight, self.bias, residual, self.gemm_backend)
        else:
            y = self.quantized(x, self.bias, residual)
        if self.lora is not None and self.lora.active:
            self.lora.add_to(x, y)
        return y

    def forward_gated(self, gate_up: torch.Tensor, residual: torch.Tensor | None, act: str = "silu") -> torch.Tensor:
        """residual + (silu(gate) * up) W^T (+ b) for gate_up [M, 2 * in] = [gate | up]: a gated MLP's down
        projection. Under w8a8 in bfloat16 on the C++ kernels the activation and the quantization of its result are
        one pass (not while LoRA adapters need the activation); otherwise ``ops.silu_mul``, then this layer through
        the module call."""
        if act != "silu":  # Gemma's GeGLU
            return self(self.ops.gelu_tanh_mul(gate_up), residual)
        if isinstance(self.quantized, W8A8Weight) and not (self.lora is not None and self.lora.active):
            y = self.quantized.forward_silu_mul(gate_up, self.bias, residual)
            if y is not None:
                return y
        return self(self.ops.silu_mul(gate_up), residual)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T + b, through the module call (so forward hooks, e.g. SmoothQuant's statistics, see it)."""
        return self(x, residual)

    def forward_act(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """act(x W^T + b), ``act`` one of gemm.ACTIVATIONS (a GEMM epilogue on the float path)."""
        if self.quantized is None:
            return linear_act(x, self.weight, self.bias, act, self.gemm_backend)
        return ACTIVATIONS[act][2](self.quantized(x, self.bias))


class MLP(nn.Module):
    """A gated (SiLU) MLP: down(silu(gate(x)) * up(x)), gate and up fused into one GEMM. Under tensor parallelism
    this rank's slice of the intermediate channels."""

    def __init__(self, hidden_size: int, intermediate_size: int, build: Build, act: str = "silu") -> None:
        super().__init__()
        self.act = act  # silu, or gelu_pytorch_tanh (Gemma's GeGLU)
        self.tp = build.tp
        self.intermediate_size = build.tp.split(intermediate_size, "intermediate_size")  # this rank's
        self.gate_up_proj = Linear(hidden_size, 2 * self.intermediate_size, False, build,
                                   shard_sizes=(self.intermediate_size,) * 2)
        self.down_proj = Linear(self.intermediate_size, hidden_size, False, build)

    def partial(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """[n, hidden] -> [n, hidden]: this rank's part of the MLP's output (+ ``residual``, in the down GEMM's
        epilogue)."""
        return self.down_proj.forward_gated(self.gate_up_proj(x), residual, self.act)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + MLP(x), the add in the down projection's epilogue (under TP: rank 0's, then the sum)."""
        if self.tp.size == 1:
            return self.partial(x, residual)
        return self.tp.all_reduce(self.partial(x, residual if self.tp.rank == 0 else None))


class Embedding(nn.Module):
    """The token embeddings; split over a tensor-parallel group by vocabulary rows (rank r holds rows
    ``start:start + per_rank``, the last slice zero-padded past the vocabulary): a rank looks up the ids in its
    slice, zeros the others, and the ranks' rows are summed."""

    def __init__(self, num_embeddings: int, dim: int, build: Build) -> None:
        super().__init__()
        self.tp = build.tp
        self.vocab_start, rows = build.tp.pad_split(num_embeddings)
        self.dtype = build.dtype  # of the rows it returns; the table is in build.param_dtype
        self.weight = nn.Parameter(torch.empty(rows, dim, dtype=build.param_dtype, device=build.device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, dim]
        if self.tp.size == 1:
            return F.embedding(ids, self.weight).to(self.dtype)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])  # [num_tokens]
        x = F.embedding(local.masked_fill(outside, 0), self.weight).to(self.dtype)
        return self.tp.all_reduce(x.masked_fill_(outside[:, None], 0.0))
