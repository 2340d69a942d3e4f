"""model/gemm.py: the oneDNN CPU linears (plain, with an activation epilogue, with a residual-add epilogue) equal
the aten ops they replace, are really the ones that run, the backend is a per-model choice (engine option
``cpu_gemm``), and unknown names are rejected."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill.config import ConfigError
from tokenmill.model import gemm


def _ops_run(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_onednn_linears_equal_aten(dtype, rows):
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
        results[name] = [gemm.linear(x, w, b, name), gemm.linear(x, w, None, name),
                         gemm.linear_add(h, w2, b2, res, name)]
        results[name] += [gemm.linear_act(x, w, b, act, name) for act in gemm.ACTIVATIONS]
    for got, want in zip(results["onednn"], results["aten"]):
        assert got.dtype == dtype and got.shape == want.shape
        torch.testing.assert_close(got.float(), want.float(), **tol)
    # and against float64 math, so the aten path is not the only witness
    want64 = F.gelu(F.linear(x.double(), w.double(), b.double()))
    torch.testing.assert_close(results["onednn"][3].double(), want64, **tol)


def test_backend_decides_which_kernel_runs():
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    x, w = torch.randn(64, 32), torch.randn(48, 32)
    assert "mkldnn::_linear_pointwise" in _ops_run(lambda: gemm.linear(x, w, None, "onednn"))
    ops = _ops_run(lambda: gemm.linear(x, w, None, "aten"))
    assert "mkldnn::_linear_pointwise" not in ops and ("aten::mm" in ops or "aten::linear" in ops)


def test_the_backend_is_a_per_model_engine_option(tmp_path):
    """cpu_gemm="aten" reaches every linear layer and the LM head of that model only; other models keep oneDNN."""
    from helpers import save_tiny_model
    from tokenmill import LLM
    from tokenmill.model.layers import Linear

    save_tiny_model("llama3_tied", tmp_path / "m")
    aten = LLM(str(tmp_path / "m"), cpu_gemm="aten", kv_cache_memory=0.05).engine.runner.model
    default = LLM(str(tmp_path / "m"), kv_cache_memory=0.05).engine.runner.model
    expected = "onednn" if gemm._onednn_available() else "aten"
    assert aten.gemm_backend == "aten" and default.gemm_backend == expected
    assert all(m.gemm_backend == "aten" for m in aten.modules() if isinstance(m, Linear))
    assert all(m.gemm_backend == expected for m in default.modules() if isinstance(m, Linear))
    ids = [5, 9, 13, 2, 7]
    torch.testing.assert_close(torch.tensor(LLM(str(tmp_path / "m"), cpu_gemm="aten", kv_cache_memory=0.05)
                                            .engine.score(ids)),
                               torch.tensor(LLM(str(tmp_path / "m"), kv_cache_memory=0.05).engine.score(ids)),
                               atol=1e-4, rtol=1e-4)


def test_backend_names_are_checked():
    with pytest.raises(ConfigError, match="onednn, aten"):
        gemm.check_backend("mkl")
    from tokenmill.config import EngineConfig

    with pytest.raises(ConfigError, match="cpu_gemm"):
        EngineConfig.from_dict({"cpu_gemm": "fast"})
