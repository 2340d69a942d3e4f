"""LoRA adapters of a mixture of experts (its attention, dense MLP, shared expert and routed experts): PEFT is the
reference, as in test_lora.py; each expert adds its rows' adapters' updates over its own rows, in the experts' one
C++ call where the kernels are there."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import (assert_greedy_equal, held_lora_bytes, hf_greedy, prompt_logprobs, save_lora_adapter,
                     save_tiny_model)
from tokenmill import LLM, SamplingParams

NEW = 10


_EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # PEFT's target_parameters (transformers 5)


def _split_per_expert(src, dst, arch: str, hf_config, rank: int) -> None:
    """Rewrites an adapter of the fused experts (PEFT target_parameters: lora_A [r * E, in] expert-major, lora_B
    [out, r * E] rank-major) in the per-expert layout of adapters trained on transformers 4.x (Mixtral:
    ``block_sparse_moe.experts.N.w1 / w3 / w2``; the others: ``mlp.experts.N.gate_proj / up_proj / down_proj``), a
    fused gate|up factor as gate's and up's (one A, B's two halves): the same update, another file layout."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    group = "block_sparse_moe" if arch == "mixtral" else "mlp"
    cfg["target_modules"], cfg["target_parameters"] = [*cfg["target_modules"], *names], None
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    experts = getattr(hf_config, "num_local_experts", None) or hf_config.num_experts
    intermediate = getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size
    out, fused = {}, {}
    for key, t in load_file(str(src / "adapter_model.safetensors")).items():
        m = re.fullmatch(r"(.*layers\.\d+)\.mlp\.experts((?:\.base_layer)*)\.lora_([AB])\.weight", key)
        if m is None:
            out[key] = t
        else:
            fused.setdefault(m.group(1, 2), {})[m.group(3)] = t
    for (prefix, _), f in fused.items():
        a3, b3 = f["A"].reshape(experts, rank, -1), f["B"].reshape(f["B"].shape[0], rank, experts)
        gate_up = f["B"].shape[0] == 2 * intermediate
        for e in range(experts):
            for name, b in zip(names[:2], b3[:, :, e].chunk(2)) if gate_up else [(names[2], b3[:, :, e])]:
                out[f"{prefix}.{group}.experts.{e}.{name}.lora_A.weight"] = a3[e].clone()
                out[f"{prefix}.{group}.experts.{e}.{name}.lora_B.weight"] = b.contiguous()
    save_file(out, str(dst / "adapter_model.safetensors"))


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_adapters_of_a_mixture_of_experts_equal_peft(arch, tmp_path):
    """Adapters of a MoE model's experts (PEFT's target_parameters over transformers 5's fused expert parameters, and
    the same factors in the per-expert layout of older adapters), its attention, and on Qwen2-MoE (a dense first
    layer, then a sparse one with a shared expert) its dense MLP and shared expert: a busy chunked batch mixing them
    and the base model equals each one's PEFT model, each expert adding its update over its own rows."""
    hf = save_tiny_model(arch, tmp_path / "base")
    mlp = ["gate_proj", "up_proj", "down_proj"] if arch == "qwen2_moe" else []
    peft = {"experts": save_lora_adapter(tmp_path / "base", tmp_path / "experts", 4, 8, [], False, seed=1,
                                         target_parameters=_EXPERT_PARAMS),
            "all": save_lora_adapter(tmp_path / "base", tmp_path / "all", 8, 16, ["q_proj", "v_proj", *mlp], True,
                                     seed=2, target_parameters=_EXPERT_PARAMS)}
    _split_per_expert(tmp_path / "experts", tmp_path / "split", arch, hf.config, 4)
    peft["split"], peft[None] = peft["experts"], hf
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))] for _ in range(4)]
    cases = [(p, n) for p in prompts for n in peft]
    llm = LLM(str(tmp_path / "base"), lora_adapters={n: str(tmp_path / n) for n in ("experts", "all", "split")},
              block_size=4, max_num_batched_tokens=48, prefill_chunk_size=7, max_num_seqs=16)
    assert llm.engine.runner.model.layers[1].mlp.expert_loras is not None
    outs = llm.generate([p for p, _ in cases], [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                               lora=n) for _, n in cases], use_tqdm=False)
    for (p, n), out in zip(cases, outs):
        assert_greedy_equal(out.token_ids, *hf_greedy(peft[n], p, NEW), f"{arch} adapter {n} prompt {p[:3]}")
    by_prompt = [{n: o.token_ids for (_, n), o in zip(cases[i:i + len(peft)], outs[i:i + len(peft)])}
                 for i in range(0, len(cases), len(peft))]
    assert sum(d["experts"] != d[None] for d in by_prompt) >= 3  # the experts' updates matter
    if arch == "mixtral":  # two ranks: the experts' factors cut as their weights are (gate|up's B rows, down's A)
        two = LLM(str(tmp_path / "base"), lora_adapters={n: str(tmp_path / n) for n in ("experts", "all")},
                  block_size=4, max_num_batched_tokens=48, prefill_chunk_size=7, tensor_parallel_size=2)
        try:
            mine = [(p, n) for p, n in cases if n != "split"]
            got = two.generate([p for p, _ in mine], [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                                     lora=n) for _, n in mine], use_tqdm=False)
        finally:
            two.close()
        assert [o.token_ids for o in got] == [o.token_ids for (_, n), o in zip(cases, outs) if n != "split"]


def test_adapters_of_quantized_experts_stay_close_to_the_float_ones(tmp_path):
    """The experts' updates are added to whatever their quantized GEMMs give (the experts then run one by one, not in
    the one-call kernels): int8 experts under an adapter score like the float model under it."""
    save_tiny_model("mixtral", tmp_path / "base")
    save_lora_adapter(tmp_path / "base", tmp_path / "experts", 4, 8, [], False, seed=1,
                      target_parameters=_EXPERT_PARAMS)
    ids = [(7 * i + 2) % 200 + 3 for i in range(40)]
    got = {}
    for q in ("none", "int8"):
        llm = LLM(str(tmp_path / "base"), lora_adapters={"experts": str(tmp_path / "experts")}, quantization=q,
                  cache_dir=str(tmp_path), kv_cache_memory=0.05)
        for name in ("experts", None):
            got[(q, name)] = prompt_logprobs(llm, ids, name)
    assert (got[("int8", "experts")] - got[("none", "experts")]).abs().mean() < 0.02
    assert (got[("none", "experts")] - got[("none", None)]).abs().mean() > 0.1


def test_bad_adapters_of_a_mixture_of_experts_are_one_clear_error(tmp_path):
    """Factors for a dense MLP the layer does not have, an expert it does not have, fused factors of the wrong rank,
    a router in target_parameters: one clear LoraError each."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tokenmill.model.lora import LoraError

    hf = save_tiny_model("qwen2_moe", tmp_path / "base")
    assert hf.config.mlp_only_layers == [0]
    save_lora_adapter(tmp_path / "base", tmp_path / "ok", 4, 8, ["q_proj"], False, seed=1,
                      target_parameters=_EXPERT_PARAMS)

    def variant(name, cfg_change=None, add=None, drop=()):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, **(cfg_change or {})}))
        tensors = {k: v for k, v in load_file(str(tmp_path / "ok" / "adapter_model.safetensors")).items()
                   if not any(d in k for d in drop)}
        save_file({**tensors, **(add or {})}, str(tmp_path / name / "adapter_model.safetensors"))
        return str(tmp_path / name)

    h, i = hf.config.hidden_size, hf.config.moe_intermediate_size
    prefix = "base_model.model.model.layers.1.mlp"
    cases = {  # hand-made files (no PEFT run writes them)
        "dense": ({"target_modules": ["q_proj", "gate_proj"]},
                  {f"{prefix}.gate_proj.lora_A.weight": torch.zeros(4, h),
                   f"{prefix}.gate_proj.lora_B.weight": torch.zeros(i, 4)}, (),
                  "layer 1's MLP \\(gate_proj\\), which is a mixture of experts there"),
        "expert9": ({"target_modules": ["q_proj", "up_proj"]},
                    {f"{prefix}.experts.9.up_proj.lora_A.weight": torch.zeros(4, h),
                     f"{prefix}.experts.9.up_proj.lora_B.weight": torch.zeros(i, 4)}, (),
                    "adapts an expert this model does not have \\(4 experts a layer\\)"),
        "shared0": ({"target_modules": ["q_proj", "up_proj"]},
                    {"base_model.model.model.layers.0.mlp.shared_expert.up_proj.lora_A.weight": torch.zeros(4, h),
                     "base_model.model.model.layers.0.mlp.shared_expert.up_proj.lora_B.weight": torch.zeros(i, 4)},
                    (), "layer 0's shared_expert.up_proj, which this model does not have \\(a dense MLP there\\)"),
        "rank": ({"r": 2}, None, ("q_proj",), "fused experts have lora_A \\(16, 64\\).*with 4 experts.*"
                                              "\\(8, 64\\) and \\(128, 8\\) for gate_up_proj \\(r=2\\)"),
        "pattern": ({"rank_pattern": {"experts\\.down_proj": 2}}, None, ("q_proj",),
                    "lora_A \\(16, 64\\) and lora_B \\(64, 16\\).*\\(16, 64\\) and \\(128, 16\\) for gate_up_proj "
                    "\\(r=4\\), or \\(8, 64\\) and \\(64, 8\\) for down_proj \\(r=2\\)"),
        "router": ({"target_parameters": ["mlp.gate.weight", *_EXPERT_PARAMS]}, None, (),
                   "target_parameters mlp.gate.weight: tokenmill adapts the fused experts' gate_up_proj and "
                   "down_proj parameters only"),
    }
    for name, (cfg_change, add, drop, message) in cases.items():
        with pytest.raises(LoraError, match=message):
            LLM(str(tmp_path / "base"), lora_adapters={name: variant(name, cfg_change, add, drop)},
                kv_cache_memory=0.01)
    # the fused experts' rank from rank_pattern, named as PEFT names the parameter: r=2 elsewhere, 4 there
    from tokenmill.model.lora import read_adapter
    from tokenmill.model.model_config import ModelConfig

    ok = variant("patterned", {"r": 2, "rank_pattern": {r"experts\.(gate_up|down)_proj": 4}}, None, ("q_proj",))
    ad = read_adapter("patterned", ok, ModelConfig.from_hf_dict(hf.config.to_dict()))
    assert {fa.shape[0] for fa, _ in ad.factors.values()} == {4} and len(ad.factors) == 2 * 4


def test_adapters_of_experts_through_the_triton_family_equal_peft(tmp_path):
    """On the Triton family float experts run as grouped launches over stacked weights; a step with an adapter's rows
    runs them one by one instead (each adding its update): equal to PEFT beside the base model."""
    hf = save_tiny_model("mixtral", tmp_path / "base")
    peft = save_lora_adapter(tmp_path / "base", tmp_path / "experts", 4, 8, ["q_proj"], False, seed=1,
                             target_parameters=_EXPERT_PARAMS)
    llm = LLM(str(tmp_path / "base"), lora_adapters={"experts": str(tmp_path / "experts")}, block_size=4,
              max_num_batched_tokens=48, prefill_chunk_size=7, attention_backend="triton")
    assert llm.engine.runner.model.layers[0].mlp.stacked is not None
    rng = random.Random(6)
    cases = [(p, n) for p in ([rng.randrange(3, 256) for _ in range(12)], [9, 8, 7]) for n in (None, "experts")]
    outs = llm.generate([p for p, _ in cases], [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                               lora=n) for _, n in cases], use_tqdm=False)
    for (p, n), out in zip(cases, outs):
        assert_greedy_equal(out.token_ids, *hf_greedy(peft if n else hf, p, NEW), f"triton experts {n} {p[:3]}")
    assert outs[0].token_ids != outs[1].token_ids


def test_rows_of_an_adapter_without_expert_factors_keep_the_experts_usual_path(tmp_path):
    """On a layer whose experts some adapter adapts, the rows of an adapter of the attention only need no expert
    updates: such a step takes the experts' usual (one-call) path, and still equals PEFT."""
    save_tiny_model("mixtral", tmp_path / "base")
    peft = {"attn": save_lora_adapter(tmp_path / "base", tmp_path / "attn", 4, 8, ["q_proj", "o_proj"], False, seed=4),
            "experts": save_lora_adapter(tmp_path / "base", tmp_path / "experts", 4, 8, [], False, seed=5,
                                         target_parameters=_EXPERT_PARAMS)}
    llm = LLM(str(tmp_path / "base"), lora_adapters={n: str(tmp_path / n) for n in peft}, kv_cache_memory=0.05)
    moe = llm.engine.runner.model.layers[0].mlp
    assert moe.expert_slots == {1}
    token_of, counts = torch.arange(6) // 2, [2, 1, 3, 0]  # grouped rows 0-1: expert 0, 2: 1, 3-5: 2
    for groups, expected in (([(0, 0, 3)], None), ([(0, 0, 1), (1, 1, 3)], [None, [1, 0, 1], [1, 0, 3], None])):
        moe.expert_loras.groups = groups
        assert moe._lora_rows(token_of, counts, 3, torch.float32) == expected
    moe.expert_loras.groups = []
    prompts = [[7, 8, 9, 10, 11], [12, 13, 14]]
    for name in peft:
        outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=name),
                            use_tqdm=False)
        for p, out in zip(prompts, outs):
            assert_greedy_equal(out.token_ids, *hf_greedy(peft[name], p, NEW), f"mixtral {name} {p[:3]}")


@pytest.mark.parametrize("quantization,params", [("none", _EXPERT_PARAMS), ("int8", _EXPERT_PARAMS),
                                                  ("int4", _EXPERT_PARAMS), ("w8a8", _EXPERT_PARAMS),
                                                  ("w8a8", _EXPERT_PARAMS[:1])], ids=["none", "int8", "int4", "w8a8",
                                                                                      "w8a8-gate-up-only"])
def test_the_experts_updates_in_one_call_equal_the_loop(tmp_path, quantization, params):
    """With adapter rows in the step, the experts on the C++ kernels take one call (float: moe_experts_lora; int8 /
    int4 weight-only panels: moe_experts_panels_lora; w8a8: moe_experts_w8a8_lora), each expert's updates added in
    the C++ loop, equal to the experts' Python loop, their Linears adding the updates, bit for bit: runs of two
    adapters, base-model rows, an expert without rows; w8a8 with the down layers adapted (the activation made on its
    own for the update) and not (the fused SiLU-and-quantize)."""
    save_tiny_model("mixtral", tmp_path / "base")
    names = {"e1": 5, "e2": 6}
    for name, seed in names.items():
        save_lora_adapter(tmp_path / "base", tmp_path / name, 4, 8, ["q_proj"], False, seed=seed,
                          target_parameters=params)
    llm = LLM(str(tmp_path / "base"), lora_adapters={n: str(tmp_path / n) for n in names}, kv_cache_memory=0.05,
              quantization=quantization, dtype="bfloat16" if quantization in ("int4", "w8a8") else "float32")
    moe = llm.engine.runner.model.layers[0].mlp
    assert (moe.experts[0].down_proj.lora is not None) == (len(params) == 2)
    call, ready = {"none": ("moe_experts_lora", moe.one_call),
                   "w8a8": ("moe_experts_w8a8_lora", moe.w8a8_call and moe._w8a8_operands() is not None)}.get(
        quantization) or ("moe_experts_panels_lora", moe.panels_call and bool(moe._panel_operands()))
    if not ready or moe._lora_factors() is None:
        pytest.skip(f"{call} needs the C++ kernels (int4's panels: AMX; w8a8's: VNNI)")
    g = torch.Generator().manual_seed(0)
    token_of = torch.tensor([0, 1, 2, 3, 0, 4, 5, 1, 2, 3, 4, 5])  # grouped rows -> tokens (6 tokens, top-2)
    counts = [4, 3, 5, 0]
    dtype = llm.engine.runner.model.embed_tokens.weight.dtype
    xs = torch.randn(12, llm.engine.model_config.hidden_size, generator=g).to(dtype)
    moe.expert_loras.groups = [(0, 0, 2), (1, 2, 5)]  # tokens 0-1: adapter 0, 2-4: adapter 1, 5: the base model
    try:
        rows = moe._lora_rows(token_of, counts, 6, dtype)
        assert rows[3] is None and all(rows[:3])
        loop = moe._experts_loop(xs, counts, rows)
        called = []
        kernels = moe.ops.kernels
        moe.ops.kernels = type("Spy", (), {call: lambda self, *a: called.append(1) or getattr(kernels, call)(*a)})()
        try:
            one = moe._experts(xs, counts, rows)
        finally:
            moe.ops.kernels = kernels
        assert called and torch.equal(one, loop)
        assert not torch.equal(loop, moe._experts_loop(xs, counts, None))  # the updates are there
    finally:
        moe.expert_loras.groups = []


def test_the_plan_counts_the_experts_factors_as_the_model_holds_them(tmp_path):
    """On Qwen2-MoE (a dense first layer, then a sparse one with a shared expert) the memory plan's LoRA bytes equal
    what the attached factors hold: adapters of the attention, the dense MLP, the shared expert and every routed
    expert (those keep A and B^T only), of two ranks."""
    save_tiny_model("qwen2_moe", tmp_path / "base")
    save_lora_adapter(tmp_path / "base", tmp_path / "experts", 4, 8, [], False, seed=1,
                      target_parameters=_EXPERT_PARAMS)
    save_lora_adapter(tmp_path / "base", tmp_path / "all", 8, 16, ["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                    "down_proj"], False, seed=2,
                      target_parameters=_EXPERT_PARAMS)
    llm = LLM(str(tmp_path / "base"), lora_adapters={n: str(tmp_path / n) for n in ("experts", "all")},
              kv_cache_memory=0.01)
    model = llm.engine.runner.model
    assert model.layers[1].mlp.expert_loras is not None and model.layers[1].mlp.shared_expert.gate_up_proj.lora
    assert llm.engine.info.planned_lora_bytes() == held_lora_bytes(model) > 0
