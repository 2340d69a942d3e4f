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

On a CPU with AVX2 and FMA but no AVX-512 (e.g. AMD Zen 3) oneDNN's float32 kernels reach only 45-70% of the FMA
peak on these shapes, and it has no bf16 kernels at all. There the "panels" path runs tokenmill's own GEMM
(``panel_gemm``, kernels/cpu_gemm.cpp): the weight packed once into panels of 16 output channels ([N / 16, K, 16],
float32 or bfloat16, the latter widened in the register), at ~93% of the peak from 128 rows up and 1.2-2x oneDNN's
rate from 1 to 2,048 rows (BENCHMARKS.md). Its arithmetic is oneDNN's: float32 products and sums, the bias and the
residual added in float32, a bfloat16 result rounded once. A weight whose output count is not a multiple of 16 stays
on the oneDNN path.

The path is a property of each model, not of the process: every ``Linear`` (and a Llama model's LM head) holds its
``gemm_backend``. The engine option ``cpu_gemm`` (or ``set_gemm_backend(model, name)``) picks it: "auto" (the
default) is "panels" where that kernel runs (AVX2 + FMA without AVX-512, the C++ kernels built) and "onednn"
elsewhere; "aten" is plain ``F.linear`` and separate epilogue ops with plain weights. float16, other devices and torch
builds without oneDNN take the aten path. On a CPU without oneDNN's bf16 kernels, on the "onednn" path, bfloat16
weights stay plain and each bf16 linear runs as oneDNN's float32 one on widened operands, rounded once
(``_bf16_in_float32``: aten's own bf16 GEMM is 7x slower there).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import CPU_GEMMS, ConfigError


def check_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The backend a model on ``device`` gets for ``name``: "auto" is "panels" where that kernel runs (a CPU model;
    off CPU the C++ kernels are not even built for it), else "onednn"; "onednn" falls back to "aten" where this torch
    build lacks oneDNN. Raises ConfigError for any other name, and for "panels" where its kernel does not run."""
    if name not in CPU_GEMMS:
        raise ConfigError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {name!r}")
    if name == "auto":
        name = "panels" if torch.device(device).type == "cpu" and panels_available() else "onednn"
    if name == "panels" and not panels_available():
        raise ConfigError("cpu_gemm='panels' runs on CPUs with AVX2 and FMA but no AVX-512, with tokenmill's C++ "
                          "kernels built; this machine takes 'auto' (oneDNN) or 'aten'")
    return name if name in ("aten", "panels") or _onednn_available() else "aten"


@functools.cache
def _panel_kernels():
    """The C++ module when its ``panel_gemm`` runs on this CPU, else None (loads or builds the kernels once)."""
    from tokenmill.kernels import cpu_kernel

    module = cpu_kernel.load()
    return module if module is not None and module.panel_gemm_available() else None


def panels_available() -> bool:
    return _panel_kernels() is not None


PANEL = 16  # output channels a panel


def is_panels(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is packed into panels ([N / 16, K, 16]; a Linear's plain weight is 2-D)."""
    return not weight.is_mkldnn and weight.dim() == 3 and weight.shape[2] == PANEL


def is_packed(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is packed for a GEMM path (oneDNN's layout or panels), not a plain [out, in] tensor."""
    return weight.is_mkldnn or is_panels(weight)


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


def pack(weight: torch.Tensor, backend: str, activations: torch.dtype | None = None) -> torch.Tensor:
    """[out, in] -> the same weight packed for ``backend``: panels on "panels" (CPU, float32 or bfloat16, out a
    multiple of 16; other weights as on "onednn"), prepacked for oneDNN on "onednn" where oneDNN takes it (CPU,
    float32, or bfloat16 where it has bf16 kernels); otherwise the plain weight. Packing a packed weight returns it.
    ``activations``: the dtype the weight will multiply; only panels read a weight of another dtype beside them
    (bf16 under float32), so anywhere else the weight is widened to it first (the values stay the rounded ones)."""
    if activations is not None and weight.dtype != activations:
        packed = pack(weight, backend)
        return packed if is_panels(packed) else pack(unpack(weight).to(activations), backend)
    if is_packed(weight) or weight.device.type != "cpu" or weight.dim() != 2:
        return weight
    if (backend == "panels" and weight.dtype in (torch.float32, torch.bfloat16) and weight.shape[0] % PANEL == 0
            and _panel_kernels() is not None):
        return _panel_kernels().panel_pack(weight.detach())
    if backend in ("onednn", "panels") and _HAVE_ONEDNN and weight.dtype in _ONEDNN_DTYPES:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_BATCH_HINT)
    return weight


def unpack(weight: torch.Tensor) -> torch.Tensor:
    """The plain [out, in] tensor of a weight, packed or not."""
    if weight.is_mkldnn:
        return weight.to_dense()
    if is_panels(weight):  # [N / 16, K, 16] -> [N, K]
        return weight.transpose(1, 2).reshape(-1, weight.shape[1])
    return weight


def _panel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[..., in] x panels [out / 16, in, 16] (+ [out]) (+ residual [..., out]) -> [..., out] in ``out_dtype`` (x's
    dtype by default): float32 products and sums, bias and residual added in float32, rounded once."""
    n = weight.shape[0] * PANEL
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()  # [M, in]
    out_dtype = out_dtype or x.dtype
    if residual is not None:
        residual = residual.reshape(-1, n)
        if residual.dtype not in (torch.float32, torch.bfloat16):
            residual = residual.float()
        residual = residual.contiguous()
    y = _panel_kernels().panel_gemm(x2, weight, None if bias is None else bias.float().contiguous(), residual,
                                    out_dtype == torch.bfloat16)  # [M, out]
    return y.view(*lead, n).to(out_dtype)


def _use_onednn(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    if weight.is_mkldnn:  # only the oneDNN path reads a packed weight
        return True
    return (backend in ("onednn", "panels") and _HAVE_ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and weight.dtype == x.dtype)


def _bf16_in_float32(x: torch.Tensor, weight: torch.Tensor, backend: str) -> bool:
    """A bfloat16 linear on a CPU whose oneDNN has no bf16 kernels (AVX2 only): aten's own bf16 GEMM runs there at
    ~15 GFLOP/s, 7x below oneDNN's float32 one, so the operands are widened to float32 for the call (exactly: every
    bf16 is a float32; ``_widened_linear``) and the result rounded once to bf16, the arithmetic of oneDNN's bf16
    kernels (float32 products and sums). The weight stays bf16 in memory."""
    return (_WIDEN_BF16 and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and backend in ("onednn", "panels") and x.device.type == "cpu" and not weight.is_mkldnn)


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
    if is_panels(weight):
        return _panel_linear(x, weight, bias)
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
    if is_panels(weight):
        return torch_op(_panel_linear(x, weight, bias, out_dtype=torch.float32)).to(x.dtype)
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
    if is_panels(weight):
        return _panel_linear(x, weight, bias, residual)
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
