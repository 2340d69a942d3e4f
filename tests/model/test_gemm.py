"""model/gemm.py: the oneDNN CPU linears (plain, with an activation epilogue, with a residual-add epilogue) equal
the aten ops they replace, are really the ones that run, prepacked weights give the plain weights' results, the
panels path's kernel (``panel_gemm``, AVX2 without AVX-512: this CPU's build or the x86-64-v3 one) equals float64
math, the backend is a per-model choice (engine option ``cpu_gemm``, "auto" by default), and unknown names are
rejected."""

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_give_the_plain_weights_results(dtype):
    """From 8 rows up (the batches that matter) bit for bit, with every epilogue; 1 row within rounding."""
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    torch.manual_seed(0)
    w, b = torch.randn(160, 96).to(dtype), torch.randn(160).to(dtype)
    packed = gemm.pack(w, "onednn")
    if dtype not in gemm._ONEDNN_DTYPES:
        # oneDNN without bf16 kernels on this CPU (AVX2 only, e.g. AMD Zen 3): the weight stays plain, and the
        # linears take aten's path, which runs
        assert packed is w and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return
    assert packed.is_mkldnn and gemm.pack(packed, "onednn") is packed and gemm.pack(w, "aten") is w
    assert torch.equal(gemm.unpack(packed), w)
    for rows in (1, 8, 33, 300):
        x, res = torch.randn(rows, 96).to(dtype), torch.randn(rows, 160).to(dtype)
        pairs = [(gemm.linear(x, packed, b), gemm.linear(x, w, b, "onednn")),
                 (gemm.linear_add(x, packed, b, res), gemm.linear_add(x, w, b, res, "onednn"))]
        pairs += [(gemm.linear_act(x, packed, b, act), gemm.linear_act(x, w, b, act, "onednn"))
                  for act in gemm.ACTIVATIONS]
        for got, want in pairs:
            if rows >= 8:
                assert torch.equal(got, want), rows
            else:
                torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=1e-2)


@pytest.mark.parametrize("chunk", [None, 96 * 40 + 5])
def test_bf16_linears_run_in_float32_where_onednn_has_no_bf16_kernels(monkeypatch, chunk):
    """On a CPU whose oneDNN has no bf16 kernels (AVX2 only: the case is forced here on any CPU) a bf16 weight stays
    plain and each bf16 linear runs oneDNN's float32 GEMM on the widened operands, never aten's bf16 one (7x slower
    there), rounded once: within half a bf16 step of float64 math, every epilogue included; a weight larger than
    WIDEN_CHUNK (here 40 channels a chunk) widened chunk by chunk."""
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(gemm, "_ONEDNN_DTYPES", (torch.float32,))
    monkeypatch.setattr(gemm, "_WIDEN_BF16", True)
    if chunk is not None:
        monkeypatch.setattr(gemm, "WIDEN_CHUNK", chunk)
    torch.manual_seed(3)
    x, w, b = torch.randn(33, 96).bfloat16(), torch.randn(160, 96).bfloat16(), torch.randn(160).bfloat16()
    res = torch.randn(33, 160).bfloat16()
    assert gemm.pack(w, "onednn") is w
    ref = F.linear(x.double(), w.double(), b.double())
    cases = [(lambda: gemm.linear(x, w, b), ref), (lambda: gemm.linear(x, w, None), ref - b.double()),
             (lambda: gemm.linear_add(x, w, b, res), ref + res.double())]
    cases += [(lambda act=act: gemm.linear_act(x, w, b, act), ACT64[act](ref)) for act in gemm.ACTIVATIONS]
    for run, want in cases:
        ops = _ops_run(run)
        assert "mkldnn::_linear_pointwise" in ops and not {"aten::mm", "aten::addmm"} & ops, ops
        assert ("aten::slice" in ops) == (chunk is not None)  # the chunks: slices of the weight
        got = run()
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert ((got.double() - want).abs() <= 2.0 ** -8 * want.abs() + 1e-4).all()


ACT64 = {"gelu": F.gelu, "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "relu": F.relu}


def test_loaded_float_weights_are_packed_on_onednn_only(tmp_path):
    """Every float Linear and a tied LM head hold packed weights on "onednn", plain ones on "aten"; switching back
    and forth keeps the weights, and loading again into a packed model works."""
    if not gemm._onednn_available():
        pytest.skip("this torch build has no oneDNN")
    from helpers import save_tiny_model
    from tokenmill.model.layers import Linear
    from tokenmill.model.loader import iter_safetensors, load_model

    save_tiny_model("llama3_tied", tmp_path / "m")
    net = load_model(str(tmp_path / "m"), "float32", cpu_gemm="onednn").model
    linears = [m for m in net.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.is_mkldnn for m in linears) and net.tied_head.is_mkldnn
    before = [m.dense_weight().clone() for m in linears]
    gemm.set_gemm_backend(net, "aten")
    assert not any(m.weight.is_mkldnn for m in linears) and net.tied_head is None
    assert all(torch.equal(m.weight, w) for m, w in zip(linears, before))
    gemm.set_gemm_backend(net, "onednn")
    net.load_weights(iter_safetensors(tmp_path / "m"))
    assert all(m.weight.is_mkldnn and torch.equal(m.dense_weight(), w) for m, w in zip(linears, before))
    assert torch.equal(gemm.unpack(net.tied_head), net.embed_tokens.weight)
    if gemm.panels_available():  # panels for the weights whose output count is a multiple of 16, oneDNN's for others
        gemm.set_gemm_backend(net, "panels")
        for m, w in zip(linears, before):
            assert gemm.is_panels(m.weight) == (w.shape[0] % 16 == 0) and gemm.is_packed(m.weight)
            assert torch.equal(m.dense_weight(), w)
        assert gemm.is_panels(net.tied_head) and torch.equal(gemm.unpack(net.tied_head), net.embed_tokens.weight)
        net.load_weights(iter_safetensors(tmp_path / "m"))
        assert all(gemm.is_packed(m.weight) and torch.equal(m.dense_weight(), w) for m, w in zip(linears, before))


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
    expected = "panels" if gemm.panels_available() else "onednn" if gemm._onednn_available() else "aten"
    assert gemm.check_backend("auto") == expected
    assert gemm.check_backend("auto", "cuda") == ("onednn" if gemm._onednn_available() else "aten")
    assert aten.gemm_backend == "aten" and default.gemm_backend == expected
    assert all(m.gemm_backend == "aten" for m in aten.modules() if isinstance(m, Linear))
    assert all(m.gemm_backend == expected for m in default.modules() if isinstance(m, Linear))
    ids = [5, 9, 13, 2, 7]
    torch.testing.assert_close(torch.tensor(LLM(str(tmp_path / "m"), cpu_gemm="aten", kv_cache_memory=0.05)
                                            .engine.score(ids)),
                               torch.tensor(LLM(str(tmp_path / "m"), kv_cache_memory=0.05).engine.score(ids)),
                               atol=1e-4, rtol=1e-4)


def test_backend_names_are_checked():
    with pytest.raises(ConfigError, match="auto, onednn, panels, aten"):
        gemm.check_backend("mkl")
    if not gemm.panels_available():  # asked for by name where it cannot run: one clear error, no silent swap
        with pytest.raises(ConfigError, match="AVX2 and FMA but no AVX-512"):
            gemm.check_backend("panels")
    from tokenmill.config import EngineConfig

    with pytest.raises(ConfigError, match="cpu_gemm"):
        EngineConfig.from_dict({"cpu_gemm": "fast"})


@pytest.mark.parametrize("bias", [False, True])
def test_addmm_residual_equals_the_separate_add(bias):
    """CUDA's residual add in the GEMM (cuBLAS's beta = 1), checked here with the CPU's addmm."""
    from tokenmill.model.gemm import addmm_residual

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 5, 48, generator=g), torch.randn(40, 48, generator=g)
    res, b = torch.randn(2, 5, 40, generator=g), torch.randn(40, generator=g) if bias else None
    got = addmm_residual(x, w, b, res)
    assert got.shape == (2, 5, 40)
    torch.testing.assert_close(got, res + torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


def _panel_case(kernels, m: int, n: int, k: int, wdtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = (torch.randn(n, k, generator=g) * 0.1).to(wdtype)
    return x, w, kernels.panel_pack(w)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_panel_gemm_equals_float64_math(kernels, wdtype):
    """panel_gemm over float32 and bfloat16 panels: row counts around the 6-row register tile and past a 144-row
    block, K past a 288 block (several partial sums), bias, float32 and bfloat16 residuals, a bfloat16 result rounded
    once; each row's result is the same bit for bit whatever the rows beside it. Builds with AVX-512 say it does not
    run there and refuse the call."""
    x, w, wp = _panel_case(kernels, 150, 48, 600, wdtype, 1)
    assert wp.shape == (3, 600, 16) and wp.dtype == wdtype
    assert torch.equal(wp.transpose(1, 2).reshape(48, 600), w)
    if not kernels.panel_gemm_available():
        with pytest.raises(RuntimeError, match="AVX2"):
            kernels.panel_gemm(x, wp, None, None, False)
        return
    b = torch.randn(48)
    res32, res16 = torch.randn(150, 48), torch.randn(150, 48).bfloat16()
    ref = x.double() @ w.double().t()  # [150, 48]
    full = kernels.panel_gemm(x, wp, None, None, False)
    assert full.dtype == torch.float32 and full.shape == (150, 48)
    torch.testing.assert_close(full.double(), ref, atol=2e-5, rtol=1e-5)
    for rows in (1, 5, 6, 7, 13, 144, 149):
        assert torch.equal(kernels.panel_gemm(x[:rows].contiguous(), wp, None, None, False), full[:rows]), rows
    assert torch.equal(kernels.panel_gemm(x[7:20].contiguous(), wp, None, None, False), full[7:20])
    got = kernels.panel_gemm(x, wp, b, res32, False)
    assert torch.equal(got, full + b + res32)
    got16 = kernels.panel_gemm(x, wp, b, res16, True)
    assert got16.dtype == torch.bfloat16
    assert torch.equal(got16, (full + b + res16.float()).bfloat16())  # rounded once, to nearest even
    nan = kernels.panel_gemm(torch.full((2, 600), float("nan")), wp, None, None, True)
    assert nan.isnan().all()


def test_panel_gemm_rejects_bad_shapes(kernels):
    with pytest.raises(RuntimeError, match="N % 16"):
        kernels.panel_pack(torch.randn(40, 8))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.panel_pack(torch.randn(32, 8).half())
    if not kernels.panel_gemm_available():
        return
    x, _, wp = _panel_case(kernels, 4, 32, 64, torch.float32, 2)
    with pytest.raises(RuntimeError, match="x's K"):
        kernels.panel_gemm(torch.randn(4, 63), wp, None, None, False)
    with pytest.raises(RuntimeError, match="bias"):
        kernels.panel_gemm(x, wp, torch.randn(31), None, False)
    with pytest.raises(RuntimeError, match="residual"):
        kernels.panel_gemm(x, wp, None, torch.randn(3, 32), False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_panels_linears_equal_float64_math(dtype):
    """The "panels" path's linears (plain, bias, residual, each activation; leading dims kept) run panel_gemm and
    equal float64 math within the dtype's rounding; a weight whose output count is not a multiple of 16 stays on
    oneDNN's path and still runs."""
    if not gemm.panels_available():
        pytest.skip("the panels path runs on AVX2 CPUs without AVX-512 (its kernel is tested on the x86-64-v3 build)")
    torch.manual_seed(5)
    x, w, b = torch.randn(2, 17, 96).to(dtype), torch.randn(160, 96).to(dtype), torch.randn(160).to(dtype)
    res = torch.randn(2, 17, 160).to(dtype)
    wp = gemm.pack(w, "panels")
    assert gemm.is_panels(wp) and gemm.pack(wp, "panels") is wp and torch.equal(gemm.unpack(wp), w)
    ref = F.linear(x.double(), w.double(), b.double())
    cases = [(gemm.linear(x, wp, b, "panels"), ref), (gemm.linear(x, wp, None, "panels"), ref - b.double()),
             (gemm.linear_add(x, wp, b, res, "panels"), ref + res.double())]
    cases += [(gemm.linear_act(x, wp, b, act, "panels"), ACT64[act](ref)) for act in gemm.ACTIVATIONS]
    for got, want in cases:
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)
        else:  # float32 sums rounded once to bfloat16: within half a bf16 step
            assert ((got.double() - want).abs() <= 2.0 ** -8 * want.abs() + 1e-4).all()
    ops = _ops_run(lambda: gemm.linear(x, wp, b, "panels"))
    assert "mkldnn::_linear_pointwise" not in ops and not {"aten::mm", "aten::addmm"} & ops
    odd = torch.randn(40, 96).to(dtype)
    packed = gemm.pack(odd, "panels")
    assert not gemm.is_panels(packed)
    torch.testing.assert_close(gemm.linear(x, packed, None, "panels").double(),
                               F.linear(x.double(), odd.double()), atol=1e-4 if dtype == torch.float32 else 0.1,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("arch", ["llama3_tied", "mixtral"])
def test_panels_model_equals_onednn_model(tmp_path, arch):
    """A tiny model on "panels" scores a prompt as on "onednn" (float32; a tied head in panels too; a mixture's
    experts in panels too, read by the C++ experts' loop, ``moe_experts``, through the same panel GEMM)."""
    if not gemm.panels_available():
        pytest.skip("the panels path runs on AVX2 CPUs without AVX-512")
    from helpers import save_tiny_model
    from tokenmill import LLM
    from tokenmill.model.layers import Linear
    from tokenmill.model.moe import SparseMoE

    save_tiny_model(arch, tmp_path / "m")
    panels = LLM(str(tmp_path / "m"), cpu_gemm="panels", kv_cache_memory=0.05)
    net = panels.engine.runner.model
    experts = [lin for moe in net.modules() if isinstance(moe, SparseMoE)
               for e in moe.experts for lin in (e.gate_up_proj, e.down_proj)]
    assert (len(experts) > 0) == (arch == "mixtral") and all(gemm.is_panels(lin.weight) for lin in experts)
    for lin in (m for m in net.modules() if isinstance(m, Linear)):
        assert lin.gemm_backend == "panels" and gemm.is_panels(lin.weight) == (lin.out_features % 16 == 0)
    if arch == "llama3_tied":
        assert gemm.is_panels(net.tied_head)
    ids = [5, 9, 13, 2, 7, 30, 11]
    torch.testing.assert_close(torch.tensor(panels.engine.score(ids)),
                               torch.tensor(LLM(str(tmp_path / "m"), cpu_gemm="onednn", kv_cache_memory=0.05)
                                            .engine.score(ids)), atol=1e-4, rtol=1e-4)
