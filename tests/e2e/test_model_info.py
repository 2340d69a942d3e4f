"""ModelInfo: a job reads the model (tokenizer, config, LoRA adapters) once and the engine it builds uses that, not
a second reading; an info for another model is refused."""

from __future__ import annotations

import pytest

from helpers import save_lora_adapter, save_tiny_model
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.model_info import ModelInfo
from tokenmill.jobs.runner import JobContext
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tiny_with_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("info")
    save_tiny_model("llama", d / "model")
    save_lora_adapter(d / "model", d / "ad", rank=4, alpha=8, targets=["q_proj", "v_proj"], rslora=False, seed=1)
    return d


def test_the_engine_built_from_a_jobs_model_info_reads_nothing_again(tiny_with_adapter, monkeypatch):
    d = tiny_with_adapter
    options = {"model": str(d / "model"), "num_threads": 1, "lora_adapters": {"ad": str(d / "ad")}}
    ctx = JobContext(str(d / "model"), {k: v for k, v in options.items() if k != "model"}, {"max_tokens": 4})
    info = ctx.info
    assert info.config.max_model_len and [a.name for a in info.adapters] == ["ad"] and info.lora_names == {"ad"}
    assert info.model_name == "model"
    import tokenmill.model.loader as loader
    import tokenmill.model.lora as lora

    def refuse(*args, **kwargs):
        raise AssertionError("read a second time")

    monkeypatch.setattr(loader, "load_tokenizer", refuse)
    monkeypatch.setattr(lora, "read_adapter", refuse)
    engine = LLMEngine(EngineConfig.from_dict(options), ctx.grammars, info=info)
    assert engine.tokenizer is info.tokenizer and engine.info.adapters[0] is info.adapters[0]
    monkeypatch.undo()
    # and it runs the adapter as an engine that read everything itself does
    ids = info.tokenizer("a b c").input_ids
    own = LLMEngine(EngineConfig.from_dict(options))
    outs = []
    for e in (engine, own):
        e.add_request("r", ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, lora="ad"))
        done = []
        while e.has_unfinished_requests():
            done += e.step()
        outs.append(done[0].token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 5


def test_an_info_for_another_model_is_refused(tiny_with_adapter, tmp_path):
    save_tiny_model("qwen2", tmp_path / "other")
    info = ModelInfo.read(EngineConfig.from_dict({"model": str(tmp_path / "other")}))
    with pytest.raises(ValueError, match="describes"):
        LLMEngine(EngineConfig.from_dict({"model": str(tiny_with_adapter / "model"), "num_threads": 1}), info=info)
