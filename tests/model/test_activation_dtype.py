"""Float32 activations over a bfloat16 model's weights (engine option ``activation_dtype="float32"``;
model/loader.resolve_activation_dtype): the weights stay bfloat16 where the GEMM path reads them beside float32
activations (panels), are widened where it does not (oneDNN, aten, a MoE's experts); the scores and greedy tokens are
bit for bit those of a float32 model whose weights are the same bfloat16 values; "auto" is the model's dtype, and a
bad value is one clear error."""

import pytest
import torch

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.model import gemm
from tokenmill.model.loader import resolve_activation_dtype

F32, BF16 = torch.float32, torch.bfloat16
CPU = torch.device("cpu")


def test_resolution_rules():
    assert resolve_activation_dtype("auto", BF16, CPU) == BF16
    assert resolve_activation_dtype("auto", F32, CPU) == F32
    assert resolve_activation_dtype("float32", BF16, CPU) == F32
    with pytest.raises(ValueError, match="CPU only"):
        resolve_activation_dtype("float32", BF16, torch.device("cuda"))
    with pytest.raises(ValueError, match="auto, float32"):
        resolve_activation_dtype("half", BF16, CPU)
    with pytest.raises(ConfigError, match="activation_dtype"):
        EngineConfig.from_dict({"activation_dtype": "half"})


def _bf16_exact_model(arch: str, path) -> None:
    """A tiny random model whose every weight is a bfloat16 value (stored as float32)."""
    from helpers import save_tiny_model
    from safetensors.torch import load_file, save_file

    save_tiny_model(arch, path)
    for f in path.glob("*.safetensors"):
        tensors = {k: v.to(BF16).float().contiguous() for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})


BACKENDS = ["panels", "onednn", "aten"]


@pytest.mark.parametrize("arch", ["llama3_tied", "mixtral"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_weights_in_float32_equal_the_float32_model(tmp_path, arch, backend):
    if backend == "panels" and not gemm.panels_available():
        pytest.skip("the panels path runs on AVX2 CPUs without AVX-512")
    from tokenmill import LLM, SamplingParams
    from tokenmill.model.layers import Linear

    _bf16_exact_model(arch, tmp_path / "m")
    opts = dict(cpu_gemm=backend, kv_cache_memory=0.05)
    ref = LLM(str(tmp_path / "m"), dtype="float32", **opts)
    mixed = LLM(str(tmp_path / "m"), dtype="bfloat16", activation_dtype="float32", **opts)
    info = mixed.engine.info
    assert info.dtype == BF16 and info.activation_dtype == F32 and info.compute_dtype == F32
    net = mixed.engine.runner.model
    assert net.activation_dtype == F32 and net.embed_tokens.weight.dtype == BF16
    assert all(k.dtype == F32 and v.dtype == F32 for k, v in mixed.engine.runner.kv_caches)
    for name, p in net.named_parameters():
        if "norm" in name or name.endswith(".bias"):
            assert p.dtype == F32, name
    for lin in (m for m in net.modules() if isinstance(m, Linear)):
        in_panels = gemm.is_panels(lin.weight)
        # bf16 stays bf16 only in panels (every other path reads float32 beside float32)
        assert lin.weight.dtype == (BF16 if in_panels else F32)
        assert in_panels == (backend == "panels" and lin.out_features % 16 == 0)
    if backend == "panels":  # the experts' C++ loop (moe_experts) reads the panels as the Linears do
        assert not arch == "llama3_tied" or (gemm.is_panels(net.tied_head) and net.tied_head.dtype == BF16)
        assert mixed.engine.weight_bytes < 0.6 * ref.engine.weight_bytes
    ids = [5, 9, 13, 2, 7, 30, 11, 4, 4, 17]
    assert mixed.engine.score(ids) == ref.engine.score(ids)  # same values, same float32 arithmetic: bit for bit
    prompts = [[3, 8, 21], [5, 9, 13, 2, 7, 30, 11], [40, 1, 6, 6]]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    got = [o.token_ids for o in mixed.generate(prompts, greedy, use_tqdm=False)]
    want = [o.token_ids for o in ref.generate(prompts, greedy, use_tqdm=False)]
    assert got == want


def test_auto_is_the_models_dtype_and_plans_agree(tmp_path):
    from helpers import save_tiny_model
    from tokenmill import LLM
    from tokenmill.engine.model_info import ModelInfo

    save_tiny_model("llama3_tied", tmp_path / "m")
    auto = LLM(str(tmp_path / "m"), dtype="bfloat16", kv_cache_memory=0.05).engine
    assert auto.info.activation_dtype is None and auto.runner.model.activation_dtype == BF16
    assert all(k.dtype == BF16 for k, _ in auto.runner.kv_caches)
    f32 = LLM(str(tmp_path / "m"), dtype="bfloat16", activation_dtype="float32", kv_cache_memory=0.05).engine
    for engine, options in ((auto, {}), (f32, {"activation_dtype": "float32"})):
        # the plan a job makes before loading agrees with the engine's (a float32 cache: half the blocks)
        read = ModelInfo.read(EngineConfig(model=str(tmp_path / "m"), dtype="bfloat16", kv_cache_memory=0.05,
                                           **options))
        assert read.compute_dtype == engine.info.compute_dtype and read.kv_blocks(True) == engine.info.kv_blocks(True)
    assert f32.info.kv_blocks(True)[0] == 2 * auto.info.kv_blocks(True)[0]
