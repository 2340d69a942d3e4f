"""Kernels as an object the engine is built with.

An ``Ops`` family holds every kernel the engine and its model call: paged attention (``ops.attention``, which also
writes the step's K/V into the cache), RMSNorm, RoPE, SiLU-and-mul, the sampler's argmax, packed attention for the
embedding path, and for the CPU family the compiled C++ module the quantized linears use (``ops.kernels``). One is
chosen once per engine from the device, the dtype and what this machine can build (``make_ops``), and passed down:
the model's layers, the runner and the sampler get it at construction and never ask a global loader. Tests pick one
explicitly.

Families (engine option ``attention_backend``, which names the family by its attention):
- ``reference``: ``TorchOps`` with attention one request at a time: plain torch ops, no compiled code of ours at all
  (K/V written by ``index_copy_``). The oracle.
- ``torch``: ``TorchOps`` with the decodes batched into one masked attention; any device.
- ``cpu_kernel``: ``CpuOps``, the C++ kernels (``kernels/cpu_kernel.py``); CPU only.
- ``triton``: ``TritonOps``, the Triton kernels (``kernels/triton/``); on CUDA, and on CPU under
  ``TRITON_INTERPRET=1`` (Triton's interpreter: how the tests and a user without a GPU check the GPU path).
- ``auto``: ``cpu_kernel`` on CPU where the kernels build (else ``torch``); ``triton`` on CUDA where Triton imports
  and ``TritonOps.self_check`` passes (else ``torch``, with a warning saying why).
"""

from __future__ import annotations

import os
import warnings

import torch

from tokenmill.config import ConfigError
from tokenmill.ops.torch_ops import TorchOps

Ops = TorchOps  # the interface: every family is a TorchOps with some methods replaced


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton family cannot run on ``device``, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "on a CPU the Triton kernels run only under Triton's interpreter: set TRITON_INTERPRET=1"
    if device.type not in ("cpu", "cuda"):
        return f"the Triton kernels run on CUDA (or interpreted on CPU), not on {device.type}"
    return None


def make_ops(attention_backend: str, device: torch.device | str) -> TorchOps:
    """The kernel family ``attention_backend`` (module docstring) on ``device``. Raises ConfigError when that family
    cannot run there (saying why), ValueError for an unknown name."""
    device = torch.device(device)
    name = attention_backend
    if name in ("reference", "torch"):
        return TorchOps(device, attention=name)
    if name == "triton" or (name == "auto" and device.type == "cuda"):
        problem = triton_problem(device)
        if problem is None:
            from tokenmill.ops.triton_ops import TritonOps

            ops = TritonOps(device)
            if name == "triton":
                return ops
            try:
                ops.self_check()
                return ops
            except Exception as e:  # a Triton, driver or GPU these kernels do not compile or run on
                problem = f"its self-check failed ({type(e).__name__}: {e})"
        if name == "triton":
            raise ConfigError(f"attention_backend triton: {problem}")
        warnings.warn(f"attention_backend auto: the Triton kernels are not used, {problem}; running torch's ops")
        return TorchOps(device)
    if name not in ("auto", "cpu_kernel"):
        raise ValueError(f"unknown attention backend {name!r}; known: auto, cpu_kernel, triton, torch, reference")
    if device.type != "cpu":
        if name == "cpu_kernel":
            raise ConfigError(f"attention_backend cpu_kernel runs on CPU only, not on {device.type}")
        return TorchOps(device)
    from tokenmill.kernels import cpu_kernel
    from tokenmill.ops.cpu_ops import CpuOps

    kernels = cpu_kernel.load()
    if kernels is not None:
        return CpuOps(kernels, device)
    if name == "cpu_kernel":
        raise ConfigError(f"attention_backend cpu_kernel: the C++ kernel cannot be built here "
                          f"({cpu_kernel.build_error()})")
    return TorchOps(device)


__all__ = ["Ops", "TorchOps", "make_ops", "triton_problem"]
