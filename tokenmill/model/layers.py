"""Small layers shared by the Llama family: RMSNorm and rotary position embeddings (HF "rotate half" layout)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.gemm import ACTIVATIONS, linear, linear_act, linear_add, pack, unpack
from tokenmill.model.model_config import RopeConfig
from tokenmill.model.quant import Int4Groups, Int8Groups, W8A8Weight, make_quantized_weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim]
        if x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu" and x.is_contiguous():
            kernels = _cpu_kernels()  # one fused pass, bit-equal to the ops below in these dtypes (tested)
            if kernels is not None and self.weight.dtype == x.dtype:
                return kernels.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the weights' dtype, as transformers does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _cpu_kernels():
    """The compiled CPU kernels (``tokenmill/kernels/cpu_kernel.py``), or None where they do not build."""
    from tokenmill.kernels import cpu_kernel

    return cpu_kernel.load()


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] = [gate | up] -> [..., I] silu(gate) * up; on CPU in float32 / bfloat16 one C++ pass (torch's
    roundings; a value may differ in its last bit, tested)."""
    if gate_up.device.type == "cpu" and gate_up.dtype in (torch.float32, torch.bfloat16) and gate_up.dim() == 2:
        kernels = _cpu_kernels()
        if kernels is not None:
            return kernels.silu_mul(gate_up.contiguous())
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inv_freq(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
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
    """Precomputed cos/sin for every position; applied to q and k of a flat batch by position."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.rope = head_dim, max_positions, rope
        self.build(torch.get_default_device())

    def build(self, device: torch.device | str) -> None:
        """(Re)computes the cos/sin tables on ``device`` in float32."""
        self._cached = None
        with torch.device(device):
            inv_freq = rope_inv_freq(self.head_dim, self.rope)
            positions = torch.arange(self.max_positions, dtype=torch.float32)
            freqs = torch.outer(positions, inv_freq)  # [max_pos, head_dim/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [max_pos, head_dim]
            self.register_buffer("cos", emb.cos(), persistent=False)
            self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """positions [num_tokens]; q [num_tokens, heads, head_dim]; k [num_tokens, kv_heads, head_dim]. On CPU in
        float32 / bfloat16 one C++ pass over q and k (bit-equal to the torch ops below, tested)."""
        cos, sin = self._cos_sin(positions, q.dtype)  # [num_tokens, 1, head_dim] each
        if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.stride(-1) == 1:
            kernels = _cpu_kernels()
            if kernels is not None:
                q, k = kernels.rope(q, k, cos[:, 0], sin[:, 0])
                return q, k
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows for ``positions`` in ``dtype``. Every layer of a forward pass gets the same positions tensor, so
        the gather and cast run once per pass, not once per layer (the tensor is held, so ``is`` is a safe test)."""
        cached = self._cached
        if cached is None or cached[0] is not positions or cached[1] != dtype:
            cos = self.cos[positions].unsqueeze(1).to(dtype)
            sin = self.sin[positions].unsqueeze(1).to(dtype)
            self._cached = cached = (positions, dtype, cos, sin)
        return cached[2], cached[3]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Linear(nn.Module):
    """y = x W^T (+ b) with uninitialised storage: every weight comes from a checkpoint, so random init is waste.

    With ``quantization`` other than "none" the weight lives in ``self.quantized`` (a QuantizedWeight,
    model/quant.py) and ``self.weight`` is None; the bias stays float. Either way checkpoint tensors arrive through
    ``load_rows`` (a fused layer gets one call per shard) and ``finalize`` runs once, when every row is in (a float
    weight is then prepacked for oneDNN: model/gemm.py).
    Activations are in the default dtype at construction (the model's dtype).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quantization: str = "none") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.dtype = torch.get_default_dtype()
        self.gemm_backend = "onednn"  # the float path's CPU GEMMs (model/gemm.py; set_gemm_backend switches it)
        if quantization == "none":
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            self.quantized = None
        else:
            self.register_parameter("weight", None)
            self.quantized = make_quantized_weight(quantization, out_features, in_features)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

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
            self.use_gemm_backend(self.gemm_backend)  # packs the weight on the oneDNN path

    def use_gemm_backend(self, name: str) -> None:
        """The float path's CPU GEMMs (model/gemm.py): on "onednn" the weight is prepacked, on "aten" it is plain."""
        self.gemm_backend = name
        if self.quantized is None:
            held = self.weight.data
            w = pack(held, name) if name == "onednn" else unpack(held)
            if w is not held:
                self.weight = nn.Parameter(w, requires_grad=False)

    def _plain_weight(self) -> torch.Tensor:
        """The float weight's storage for writing rows into (unpacked first if it was packed)."""
        if self.weight.is_mkldnn:
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
                return linear(x, self.weight, self.bias, self.gemm_backend)
            return linear_add(x, self.weight, self.bias, residual, self.gemm_backend)
        return self.quantized(x, self.bias, residual)

    def forward_gated(self, gate_up: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + (silu(gate) * up) W^T (+ b) for gate_up [M, 2 * in] = [gate | up]: a gated MLP's down
        projection. Under w8a8 in bfloat16 on the C++ kernels the activation and the quantization of its result are
        one pass; otherwise ``silu_mul`` (one C++ pass on CPU), then this layer through the module call."""
        if isinstance(self.quantized, W8A8Weight):
            y = self.quantized.forward_silu_mul(gate_up, self.bias, residual)
            if y is not None:
                return y
        return self(silu_mul(gate_up), residual)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + x W^T + b, through the module call (so forward hooks, e.g. SmoothQuant's statistics, see it)."""
        return self(x, residual)

    def forward_act(self, x: torch.Tensor, act: str) -> torch.Tensor:
        """act(x W^T + b), ``act`` one of gemm.ACTIVATIONS (a GEMM epilogue on the float path)."""
        if self.quantized is None:
            return linear_act(x, self.weight, self.bias, act, self.gemm_backend)
        return ACTIVATIONS[act][2](self.quantized(x, self.bias))


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, dim]
        return F.embedding(ids, self.weight)
