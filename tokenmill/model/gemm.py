"""Dense GEMMs of the model layers: ``y = x W^T + b``, optionally with an epilogue (GELU, or a residual add).

On CPU, aten sends float32 ``F.linear`` to MKL's sgemm. MKL picks its kernels by CPU vendor, and on AMD it runs an
AVX2 path: on this project's AMD EPYC (AVX-512) it reaches ~150-180 GFLOP/s where oneDNN's AVX-512 kernels reach
~340-420 on the same shapes (the harness's roofline section measures both). bfloat16 already goes to oneDNN inside
aten. So on CPU, float32 linears here call oneDNN directly (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's
own compiler emits for CPU linears), and in float32 and bfloat16 its post-ops fold the GELU and the residual add of
an encoder layer into the GEMM's epilogue instead of extra passes over the activations.

Numerics: still IEEE float32 (or bf16 inputs with float32 accumulation); only the summation order differs from
MKL's, i.e. the last-bit rounding that any change of batch shape already causes.

On the oneDNN path the weights are also prepacked (``pack``): reordered once into oneDNN's blocked layout for this
CPU, instead of on every call. Same results bit for bit at 8 rows and more (last-bit differences at 1 row); the
GEMMs get faster by about a quarter at 32 rows and 5-15% at 128 (BENCHMARKS.md, "Prepacked weights"). A packed
weight is an opaque ``torch._mkldnn`` tensor: only these functions read it (``unpack`` gives the plain one back).

The path is a property of each model, not of the process: every ``Linear`` (and a Llama model's LM head) holds its
``gemm_backend``, "onednn" by default, "aten" (plain ``F.linear`` and separate epilogue ops, plain weights) when asked
through the engine option ``cpu_gemm`` (or ``set_gemm_backend(model, name)``); float16, other devices and torch builds
without oneDNN always take the aten path. On a CPU without oneDNN's bf16 kernels (AVX2 only, e.g. AMD Zen 3: oneDNN
refuses a bf16 weight there) bfloat16 weights stay plain and each bf16 linear runs as oneDNN's float32 one on widened
operands, rounded once (``_bf16_in_float32``: aten's own bf16 GEMM is 7x slower there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import CPU_GEMMS, ConfigError


def check_backend(name: str) -> str:
    """The backend a model gets for ``name``: "onednn" falls back to "aten" where this torch build lacks oneDNN.
    Raises ConfigError for any other name."""
    if name not in CPU_GEMMS:
        raise ConfigError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {name!r}")
    return name if name == "aten" or _onednn_available() else "aten"


def set_gemm_backend(model: nn.Module, name: str) -> None:
    """Switches every linear layer of ``model`` (and its LM head) to the CPU GEMM path ``name``, packing or
    unpacking their float weights. Call it once the weights are loaded."""
    name = check_backend(name)
    for m in model.modules():
        if hasattr(m, "use_gemm_backend"):
            m.use_gemm_backend(name)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_HAVE_ONEDNN = _onednn_available()  # a fact about this torch build


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's linears take on this CPU: float32 everywhere; bfloat16 only where its bf16 kernels run
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT: on an AVX2-only CPU such as AMD Zen 3, oneDNN refuses a bf16 weight and
    aten's bf16 F.linear takes its own path)."""
    if not _HAVE_ONEDNN:
        return ()
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


_ONEDNN_DTYPES = _onednn_dtypes()  # a fact about this CPU and torch build
# bf16 linears run as float32 ones on widened operands (_bf16_in_float32): oneDNN here has float32 kernels, not bf16
_WIDEN_BF16 = torch.float32 in _ONEDNN_DTYPES and torch.bfloat16 not in _ONEDNN_DTYPES


PACK_BATCH_HINT = 128  # the row count oneDNN picks the packed layout for; measured as good from 8 to 2048 rows


def pack(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """[out, in] -> the same weight prepacked for oneDNN when ``backend`` is "onednn" and oneDNN takes it (CPU,
    float32 or bfloat16); otherwise the plain weight. Packing a packed weight returns it."""
    if (backend == "onednn" and _HAVE_ONEDNN and not weight.is_mkldnn and weight.device.type == "cpu"
            and weight.dtype in _ONEDNN_DTYPES and weight.dim() == 2):
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
    return weight


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """The plain [out, in] tensor of a weight, packed or not."""
    return weight.to_dense() if weight.is_mkldnn else weight


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    if weight.is_mkldnn:  # only the oneDNN path reads a packed weight
        return True
    return (backend == "onednn" and _HAVE_ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and weight.dtype == x.dtype)


def _bf16_in_float32(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    """A bfloat16 linear on a CPU whose oneDNN has no bf16 kernels (AVX2 only): aten's own bf16 GEMM runs there at
    ~15 GFLOP/s, 7x below oneDNN's float32 one, so the operands are widened to float32 for the call (exactly: every
    bf16 is a float32; ``_widened_linear``) and the result rounded once to bf16, the arithmetic of oneDNN's bf16
    kernels (float32 products and sums). The weight stays bf16 in memory."""
    return (_WIDEN_BF16 and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and backend == "onednn"
            and x.device.type == "cpu" and not weight.is_mkldnn)


WIDEN_CHUNK = 1 << 20  # weight elements widened at a time: 4 MB of float32, still in cache for its GEMM


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """[..., in] bf16 x [out, in] bf16 (+ [out]) -> [..., out] float32: oneDNN's float32 GEMM on the widened
    operands, a large weight (an LM head) widened ``WIDEN_CHUNK`` elements of output channels at a time, each chunk's
    GEMM run while its float32 copy is in cache. Widening a 49,152 x 576 head whole cost 41 ms a call on an AMD EPYC
    Zen 3 (more than aten's bf16 GEMM at 6 rows, 25 ms); in chunks the call takes 12 ms at 6 rows, 55 ms at 128
    (aten: 375 ms)."""
    xf = x.float()
    rows = max(1, WIDEN_CHUNK // max(1, weight.shape[1]))
    if weight.shape[0] <= rows:
        return linear(xf, weight.float(), None if bias is None else bias.float(), backend)
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, weight.shape[0], rows):
        b = None if bias is None else bias[i:i + rows].float()
        out[..., i:i + rows] = linear(xf, weight[i:i + rows].float(), b, backend)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           backend: str = "onednn") -> torch.Tensor:
    """[..., in] x [out, in] (+ [out]) -> [..., out]."""
    if _bf16_in_float32(x, weight, backend):
        return _widened_linear(x, weight, bias, backend).to(torch.bfloat16)
    if weight.is_mkldnn or (_use_onednn(x, weight, backend) and x.dtype == torch.float32):
        # a plain bf16 weight: aten already calls oneDNN (the gain is in packing)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


# activation name -> (oneDNN post-op, its algorithm, the same op in torch)
ACTIVATIONS = {
    "gelu": ("gelu", "none", lambda y: F.gelu(y)),
    "gelu_tanh": ("gelu", "tanh", lambda y: F.gelu(y, approximate="tanh")),
    "relu": ("relu", "", F.relu),
}


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str,
               backend: str = "onednn") -> torch.Tensor:
    """act(x W^T + b) for ``act`` in ACTIVATIONS; on CPU one GEMM with the activation as its epilogue."""
    post, algorithm, torch_op = ACTIVATIONS[act]
    if _bf16_in_float32(x, weight, backend):
        return torch_op(_widened_linear(x, weight, bias, backend)).to(torch.bfloat16)
    if _use_onednn(x, weight, backend):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post, [], algorithm)
    return torch_op(F.linear(x, weight, bias))


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor,
               backend: str = "onednn") -> torch.Tensor:
    """residual + x W^T + b; one GEMM with an add epilogue on CPU (in bf16 the sum is rounded once, not twice), and
    on CUDA (``addmm_residual``: cuBLAS's beta = 1, so the residual stream needs no kernel of its own, and no fused
    add + RMSNorm either). ``residual`` [..., out] has x's leading shape (a packed weight takes it made contiguous,
    in x's dtype)."""
    if _bf16_in_float32(x, weight, backend):
        return _widened_linear(x, weight, bias, backend).add_(residual).to(torch.bfloat16)
    if weight.is_mkldnn or (_use_onednn(x, weight, backend) and residual.dtype == x.dtype
                            and residual.is_contiguous()):
        if residual.dtype != x.dtype or not residual.is_contiguous():  # (a call each, ~1 us, when it is a no-op)
            residual = residual.to(x.dtype).contiguous()
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if x.is_cuda:
        return addmm_residual(x, weight, bias, residual)
    return residual + F.linear(x, weight, bias)


def addmm_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   residual: torch.Tensor) -> torch.Tensor:
    """residual + x W^T + b as one ``addmm`` (the GEMM accumulates onto the residual); [..., in] -> [..., out]."""
    out = weight.shape[0]
    c = residual.reshape(-1, out).to(x.dtype)  # [M, out]
    if bias is not None:
        c = c + bias
    return torch.addmm(c, x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], out)
