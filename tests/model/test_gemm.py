"""model/gemm.py: the oneDNN CPU linears (plain, with an activation epilogue, with a residual-add epilogue) equal
the aten ops they replace, are really the ones that run, and the backend switch rejects unknown names."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill.config import ConfigError
from tokenmill.model import gemm


@pytest.fixture
def backend():
    """Restores the process-wide backend after a test switches it."""
    before = gemm.cpu_gemm_backend()
    yield gemm.set_cpu_gemm_backend
    gemm.set_cpu_gemm_backend(before)


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_onednn_linears_equal_aten(backend, dtype, rows):
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(rows)
    x = torch.randn(rows, 96).to(dtype)
    w, b = torch.randn(160, 96).to(dtype), torch.randn(160).to(dtype)
    w2, b2 = torch.randn(96, 160).to(dtype), torch.randn(96).to(dtype)
    h = torch.randn(rows, 160).to(dtype)
    res = torch.randn(rows, 96).to(dtype)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.25, rtol=2e-2)
    results = {}
    for name in ("onednn", "aten"):
        backend(name)
        results[name] = [gemm.linear(x, w, b), gemm.linear(x, w), gemm.linear_add(h, w2, b2, res)]
        results[name] += [gemm.linear_act(x, w, b, act) for act in gemm.ACTIVATIONS]
    for got, want in zip(results["onednn"], results["aten"]):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)
    # and against float64 math, so the aten path is not the only witness
    want64 = F.gelu(F.linear(x.double(), w.double(), b.double()))
    torch.testing.assert_close(results["onednn"][3].double(), want64, **tol)


def test_backend_decides_which_kernel_runs(backend):
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    backend("onednn")
    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: gemm.linear(x, w))
    backend("aten")
    ops = _ops_run(lambda: gemm.linear(x, w))
    assert "mkldnn::_linear_pointwise" not in ops and ("aten::mm" in ops or "aten::linear" in ops)


def test_backend_names_are_checked(backend, monkeypatch):
    with pytest.raises(ConfigError, match="onednn, aten"):
        backend("mkl")
    monkeypatch.setattr(gemm, "_backend", None)
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "fast")
    with pytest.raises(ConfigError, match="TOKENMILL_CPU_GEMM"):
        gemm.cpu_gemm_backend()
    monkeypatch.setenv("TOKENMILL_CPU_GEMM", "ATEN")
    assert gemm.cpu_gemm_backend() == "aten"
