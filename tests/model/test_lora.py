"""LoRA adapters per request: PEFT builds and saves the adapters and is the reference; a batch mixing three adapters
and the base model equals each adapter's PEFT model token for token (float32), and each run alone."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy, save_lora_adapter, save_tiny_model
from tokenmill import LLM, SamplingParams

ADAPTERS = {  # name -> (rank, alpha, targets, rslora)
    "qv": (4, 8, ["q_proj", "v_proj"], False),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    "mlp": (16, 8, ["gate_proj", "up_proj", "down_proj"], True),
}
NEW = 10


@pytest.fixture(scope="module")
def lora_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    save_tiny_model("llama", root / "base")
    refs_models = {None: None}
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        refs_models[name] = save_lora_adapter(root / "base", root / name, *spec, seed=10 + i)
    from transformers import AutoModelForCausalLM

    refs_models[None] = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 40))] for _ in range(6)]
    names = [None, *ADAPTERS]
    cases = [(p, n) for p in prompts for n in names]  # every prompt under every adapter: prefix-cache neighbours
    refs = {(tuple(p), n): hf_greedy(refs_models[n], p, NEW) for p, n in cases}
    return root, cases, refs


def _llm(root, **kw):
    return LLM(str(root / "base"), lora_adapters={n: str(root / n) for n in ADAPTERS}, block_size=4,
               num_kv_blocks=96, max_num_batched_tokens=48, prefill_chunk_size=7, max_num_seqs=16, **kw)


def test_a_batch_mixing_three_adapters_and_the_base_equals_peft(lora_case):
    root, cases, refs = lora_case
    llm = _llm(root)
    params = [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=n) for _, n in cases]
    outs = llm.generate([p for p, _ in cases], params, use_tqdm=False)
    for (p, n), out in zip(cases, outs):
        assert_greedy_equal(out.token_ids, *refs[(tuple(p), n)], f"adapter {n} prompt {p[:3]}")
    # the same prompt under different adapters continues differently (the adapters matter, the cache is per adapter)
    by_prompt = {}
    for (p, n), out in zip(cases, outs):
        by_prompt.setdefault(tuple(p), set()).add(tuple(out.token_ids))
    assert sum(len(v) > 1 for v in by_prompt.values()) >= len(by_prompt) - 1
    # each adapter's requests alone give the same tokens as inside the mixed batch
    for name in ("all", None):
        mine = [(p, o) for (p, n), o in zip(cases, outs) if n == name]
        alone = llm.generate([p for p, _ in mine], SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                                  lora=name), use_tqdm=False)
        assert [o.token_ids for o in alone] == [o.token_ids for _, o in mine]


def test_runs_through_gemms_equal_peft_too(lora_case, monkeypatch):
    """Runs longer than SHORT_RUN rows (prefill chunks) take two GEMMs a run instead of the C++ row loop: with every
    run sent there, the mixed batch still equals PEFT."""
    import tokenmill.model.lora as lora

    monkeypatch.setattr(lora, "SHORT_RUN", 0)
    root, cases, refs = lora_case
    llm = _llm(root)
    outs = llm.generate([p for p, _ in cases], [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                               lora=n) for _, n in cases], use_tqdm=False)
    for (p, n), out in zip(cases, outs):
        assert_greedy_equal(out.token_ids, *refs[(tuple(p), n)], f"GEMM runs adapter {n} prompt {p[:3]}")


def _prompt_logprobs(llm, ids: list[int], lora: str | None) -> torch.Tensor:
    """Each prompt token's log-probability (after the first) under adapter ``lora``."""
    out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, lora=lora),
                       use_tqdm=False)[0]
    return torch.tensor([lp[t] for lp, t in zip(out.prompt_logprobs[1:], ids[1:])])


def test_lora_over_a_quantized_base_stays_close_to_the_float_one(lora_case):
    """The update is added to whatever the base GEMM gives: int8 weights under an adapter score like the float
    model under it (within int8's rounding), and differently from the bare int8 model."""
    root, cases, _ = lora_case
    ids = [(5 * i + 1) % 200 + 3 for i in range(40)]
    float_llm, int8_llm = _llm(root), _llm(root, quantization="int8", cache_dir=str(root))
    got = {}
    for label, llm in (("float", float_llm), ("int8", int8_llm)):
        for name in ("all", None):
            got[(label, name)] = _prompt_logprobs(llm, ids, name)
    assert (got[("int8", "all")] - got[("float", "all")]).abs().mean() < 0.02
    assert (got[("float", "all")] - got[("float", None)]).abs().mean() > 0.1


def test_bad_adapters_and_requests_are_one_clear_error(lora_case, tmp_path):
    import shutil

    root, _, _ = lora_case
    llm = _llm(root)
    with pytest.raises(ValueError, match="unknown LoRA adapter 'nope'; loaded: all, mlp, qv"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, lora="nope"), use_tqdm=False)
    bad = tmp_path / "bad"
    shutil.copytree(root / "qv", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 6}))
    with pytest.raises(ValueError, match=r"adapter 'bad': layer 0 q_proj has lora_A \(4, 64\).*says r=6"):
        LLM(str(root / "base"), lora_adapters={"bad": str(bad)}, kv_cache_memory=0.01)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "c_attn"]}))
    with pytest.raises(ValueError, match="adapter 'bad' targets c_attn, which this model does not have"):
        LLM(str(root / "base"), lora_adapters={"bad": str(bad)}, kv_cache_memory=0.01)
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        LLM(str(root / "base"), lora_adapters={"x": str(tmp_path)}, kv_cache_memory=0.01)
    from tokenmill.config import ConfigError

    with pytest.raises(ConfigError, match="3 LoRA adapters given but max_loras=2"):
        LLM(str(root / "base"), lora_adapters={n: str(root / n) for n in ADAPTERS}, max_loras=2)


def test_a_job_picks_each_rows_adapter_and_reports_an_unknown_one(lora_case, run_cli, tmp_path):
    """``tokenmill run --lora``: a plain row's ``lora``, an OpenAI line's ``model`` naming an adapter; a row naming
    an adapter the job did not load is an error record and the job goes on; the manifest holds the adapters'
    fingerprints, so a resume with a changed adapter is refused."""
    from helpers import read_jsonl, write_jsonl

    root, cases, refs = lora_case
    (p0, _), (p1, _) = cases[0], cases[len(ADAPTERS) + 1]
    rows = [{"id": "base", "prompt": p0, "max_tokens": NEW},
            {"id": "qv", "prompt": p0, "lora": "qv", "max_tokens": NEW},
            {"id": "bad", "prompt": p0, "lora": "nope"},
            {"custom_id": "all", "method": "POST", "url": "/v1/completions",
             "body": {"model": "all", "prompt": p1, "max_tokens": NEW}}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    import shutil

    shutil.copytree(root / "qv", tmp_path / "qv")  # a copy this test may change
    lora_flags = ["--lora", f"qv={tmp_path / 'qv'}", "--lora", f"all={root / 'all'}"]
    run_cli("run", inp, "-o", out, "--model", root / "base", "--temperature", "0", "--kv-cache-memory", "0.05",
            *lora_flags, check=1)  # 1: a row failed
    recs = {r.get("custom_id", r.get("id")): r for r in read_jsonl(out)}
    tok = LLM(str(root / "base"), kv_cache_memory=0.01).engine.tokenizer

    def text(ids):
        return tok.decode(ids, skip_special_tokens=True)

    assert recs["base"]["completion"] == text(refs[(tuple(p0), None)][0])
    assert recs["qv"]["completion"] == text(refs[(tuple(p0), "qv")][0])
    body = recs["all"]["response"]["body"]
    assert body["choices"][0]["text"] == text(refs[(tuple(p1), "all")][0]) and body["model"] == "all"
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert [e["id"] for e in errors] == ["bad"] and errors[0]["code"] == "unknown_lora"
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert set(manifest["settings"]["lora_fingerprints"]) == {"qv", "all"}
    cfg = json.loads((tmp_path / "qv" / "adapter_config.json").read_text())  # the adapter changes: no resume
    (tmp_path / "qv" / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 2 * cfg["lora_alpha"]}))
    proc = run_cli("run", inp, "-o", out, "--model", root / "base", "--temperature", "0", "--kv-cache-memory", "0.05",
                   *lora_flags, check=2)
    assert "lora_fingerprints" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("run", inp, "-o", out, "--model", root / "base", "--lora", "qv", check=2)
    assert "NAME=PATH" in proc.stderr and "Traceback" not in proc.stderr


def test_phi3_adapters_of_its_fused_layers_equal_peft(tmp_path):
    """Phi-3 checkpoints fuse q|k|v and gate|up, so its adapters target qkv_proj and gate_up_proj as a whole."""
    save_tiny_model("phi3", tmp_path / "base")
    peft = save_lora_adapter(tmp_path / "base", tmp_path / "a", 8, 16, ["qkv_proj", "gate_up_proj", "o_proj"],
                             False, seed=7)
    llm = LLM(str(tmp_path / "base"), lora_adapters={"a": str(tmp_path / "a")}, kv_cache_memory=0.05)
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 30))] for _ in range(4)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora="a"),
                        use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert_greedy_equal(out.token_ids, *hf_greedy(peft, p, NEW), "phi3 adapter")
    base = llm.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in base] != [o.token_ids for o in outs]  # the adapter matters
    # two ranks: each cuts every fused part of the factors' rows as the weights are cut
    two = LLM(str(tmp_path / "base"), lora_adapters={"a": str(tmp_path / "a")}, kv_cache_memory=0.05,
              tensor_parallel_size=2)
    try:
        got = two.generate(prompts, SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora="a"),
                           use_tqdm=False)
    finally:
        two.close()
    assert [o.token_ids for o in got] == [o.token_ids for o in outs]


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
            got[(q, name)] = _prompt_logprobs(llm, ids, name)
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
        "rank": ({"r": 2}, None, ("q_proj",), "fused experts have lora_A \\(16, 64\\).*with r=2 and 4 experts"),
        "router": ({"target_parameters": ["mlp.gate.weight", *_EXPERT_PARAMS]}, None, (),
                   "target_parameters mlp.gate.weight: tokenmill adapts the fused experts' gate_up_proj and "
                   "down_proj parameters only"),
    }
    for name, (cfg_change, add, drop, message) in cases.items():
        with pytest.raises(LoraError, match=message):
            LLM(str(tmp_path / "base"), lora_adapters={name: variant(name, cfg_change, add, drop)},
                kv_cache_memory=0.01)


def test_adapters_with_two_ranks_equal_one(lora_case):
    """Tensor parallelism over gloo: each rank holds its part of every adapter (column-parallel layers' B rows,
    row-parallel layers' A columns, whose partial updates the layer's all-reduce adds up) and follows rank 0's
    adapter per request; a batch mixing three adapters and the base gives the single rank's tokens."""
    root, cases, refs = lora_case
    params = [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=n) for _, n in cases]
    one = [o.token_ids for o in _llm(root).generate([p for p, _ in cases], params, use_tqdm=False)]
    llm = _llm(root, tensor_parallel_size=2)
    try:
        two = [o.token_ids for o in llm.generate([p for p, _ in cases], params, use_tqdm=False)]
    finally:
        llm.close()
    assert two == one
    for (p, n), out in zip(cases, two):
        assert_greedy_equal(out, *refs[(tuple(p), n)], f"tp=2 adapter {n} prompt {p[:3]}")


def test_adapters_through_the_triton_family_equal_peft(lora_case):
    """The Triton family (interpreted here) runs every layer's updates as two grouped GEMM launches over the step's
    runs of adapter rows; a batch mixing three adapters and the base equals PEFT and the CPU path."""
    root, cases, refs = lora_case
    cases = cases[:8]  # two prompts under every adapter and the base
    params = [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True, lora=n) for _, n in cases]
    llm = _llm(root, attention_backend="triton")
    assert llm.engine.runner.model.loras.grouped_device is not None
    outs = [o.token_ids for o in llm.generate([p for p, _ in cases], params, use_tqdm=False)]
    for (p, n), out in zip(cases, outs):
        assert_greedy_equal(out, *refs[(tuple(p), n)], f"triton adapter {n} prompt {p[:3]}")
    assert outs == [o.token_ids for o in _llm(root).generate([p for p, _ in cases], params, use_tqdm=False)]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_out", [(64, 128), (40, 70)])
def test_the_cpp_row_loop_equals_two_gemms_a_run(kernels, dtype, in_out):
    """lora_rows (the C++ kernel short runs take: rows in blocks of 8, outputs 64 at a time, dot products 16 lanes
    wide, tails past each) equals (x A_s^T) B_s^T added to each run's rows in float32 (bfloat16: the sum rounded once,
    so within one rounding); rows outside every run are left as they were, bit for bit. Factors in bfloat16 (a
    bfloat16 model's, as LoraWeights holds them) give their float32 widening's result (the same float32 arithmetic;
    the compiler may sum a tail in another order)."""
    n_in, n_out = in_out
    g = torch.Generator().manual_seed(3)
    slots, width, n = 3, 11, 60
    x = torch.randn(n, n_in, generator=g).to(dtype)
    y = torch.randn(n, n_out, generator=g).to(dtype)
    af = torch.randn(slots, width, n_in, generator=g) * 0.1
    btf = torch.randn(slots, width, n_out, generator=g) * 0.1
    runs = [(0, 0, 1), (2, 1, 9), (1, 9, 26), (0, 30, 31), (2, 31, 59)]  # 1, 8, 17 rows...; rows 26-29 and 59 not
    ref = y.float().clone()
    for s, a, b in runs:
        ref[a:b] += (x[a:b].float() @ af[s].t()) @ btf[s]
    got = y.clone()
    kernels.lora_rows(x, got, af, btf, [v for run in runs for v in run])
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(got.float(), ref.to(dtype).float(), **tol)
    untouched = [r for r in range(n) if not any(a <= r < b for _, a, b in runs)]
    assert untouched == [26, 27, 28, 29, 59] and torch.equal(got[untouched], y[untouched])
    with pytest.raises(RuntimeError, match="a run's rows must lie in x"):
        kernels.lora_rows(x, got, af, btf, [0, 50, 61])
    af16, btf16 = af.bfloat16(), btf.bfloat16()
    wide, narrow = y.clone(), y.clone()
    kernels.lora_rows(x, wide, af16.float(), btf16.float(), [v for run in runs for v in run])
    kernels.lora_rows(x, narrow, af16, btf16, [v for run in runs for v in run])
    torch.testing.assert_close(narrow, wide, atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="of one dtype"):
        kernels.lora_rows(x, got, af16, btf, [0, 0, 1])


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


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_the_experts_updates_in_one_call_equal_the_loop(tmp_path, quantization):
    """With adapter rows in the step, the experts on the C++ kernels take one call (float: moe_experts_lora; int8 /
    int4 weight-only panels: moe_experts_panels_lora), each expert's updates added in the C++ loop, equal to the
    experts' Python loop, their Linears adding the updates, bit for bit: runs of two adapters, base-model rows, an
    expert without rows."""
    save_tiny_model("mixtral", tmp_path / "base")
    names = {"e1": 5, "e2": 6}
    for name, seed in names.items():
        save_lora_adapter(tmp_path / "base", tmp_path / name, 4, 8, ["q_proj"], False, seed=seed,
                          target_parameters=_EXPERT_PARAMS)
    llm = LLM(str(tmp_path / "base"), lora_adapters={n: str(tmp_path / n) for n in names}, kv_cache_memory=0.05,
              quantization=quantization, dtype="bfloat16" if quantization == "int4" else "float32")
    moe = llm.engine.runner.model.layers[0].mlp
    call = "moe_experts_lora" if quantization == "none" else "moe_experts_panels_lora"
    ready = moe.one_call if quantization == "none" else moe.panels_call and bool(moe._panel_operands())
    if not ready or moe._lora_factors() is None:
        pytest.skip(f"{call} needs the C++ kernels (int4's panels: AMX)")
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
