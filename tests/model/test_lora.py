"""LoRA adapters per request: PEFT builds and saves the adapters and is the reference; a batch mixing three adapters
and the base model equals each adapter's PEFT model token for token (float32), and each run alone. Adapters of a
mixture of experts: test_lora_moe.py."""

from __future__ import annotations

import json
import random

import pytest
import torch

from helpers import (assert_greedy_equal, held_lora_bytes, hf_greedy, prompt_logprobs, save_lora_adapter,
                     save_tiny_model)
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


def test_lora_over_a_quantized_base_stays_close_to_the_float_one(lora_case):
    """The update is added to whatever the base GEMM gives: int8 weights under an adapter score like the float
    model under it (within int8's rounding), and differently from the bare int8 model."""
    root, cases, _ = lora_case
    ids = [(5 * i + 1) % 200 + 3 for i in range(40)]
    float_llm, int8_llm = _llm(root), _llm(root, quantization="int8", cache_dir=str(root))
    got = {}
    for label, llm in (("float", float_llm), ("int8", int8_llm)):
        for name in ("all", None):
            got[(label, name)] = prompt_logprobs(llm, ids, name)
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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_plan_counts_the_adapters_factors_as_the_model_holds_them(lora_case, dtype):
    """The memory plan's LoRA bytes (``planned_lora_bytes``, from the adapters as read, before the model is built)
    are the bytes the attached factors hold: three adapters of ranks 4, 8 and 16 over different layers (q|k|v takes
    q and v of one, all three of another: each layer's factors padded to its widest), B^T beside them on a CPU."""
    root, _, _ = lora_case
    llm = _llm(root, dtype=dtype)
    info = llm.engine.info
    assert info.planned_lora_bytes() == held_lora_bytes(llm.engine.runner.model) > 0
    base = LLM(str(root / "base"), dtype=dtype, kv_cache_memory=0.01).engine.info
    assert info.planned_weight_bytes() - info.planned_lora_bytes() == base.planned_weight_bytes()


def test_the_plan_command_takes_adapters(lora_case, run_cli, tmp_path):
    """`tokenmill plan --lora NAME=PATH`: the weights include the adapters' factors, and rows naming a loaded adapter
    are counted (without the flag they are invalid lines)."""
    from helpers import write_jsonl

    root, cases, _ = lora_case
    rows = [{"id": "a", "prompt": cases[0][0]}, {"id": "b", "prompt": cases[0][0], "lora": "qv"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    flags = ["--model", root / "base", "--kv-cache-memory", "0.05", "--json"]
    proc = run_cli("plan", inp, *flags, "--lora", f"qv={root / 'qv'}", "--lora", f"mlp={root / 'mlp'}", check=0)
    plan = json.loads(proc.stdout)
    llm = LLM(str(root / "base"), lora_adapters={n: str(root / n) for n in ("qv", "mlp")}, kv_cache_memory=0.01)
    assert plan["num_requests"] == 2 and plan["num_loras"] == 2 and "invalid" not in proc.stderr
    assert plan["lora_gib"] * 2**30 == pytest.approx(held_lora_bytes(llm.engine.runner.model))
    proc = run_cli("plan", inp, *flags, check=0)  # without the adapters
    base = json.loads(proc.stdout)
    assert base["num_requests"] == 1 and "1 invalid lines" in proc.stderr
    assert plan["weight_gib"] - base["weight_gib"] == pytest.approx(plan["lora_gib"])
    assert "of which 2 LoRA adapters" in run_cli("plan", inp, *flags[:-1], "--lora", f"qv={root / 'qv'}", "--lora",
                                                 f"mlp={root / 'mlp'}", check=0).stdout


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


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys:RuntimeWarning")  # "proj", on purpose
@pytest.mark.parametrize("rslora", [False, True])
def test_per_module_ranks_and_alphas_equal_peft(lora_case, tmp_path, rslora):
    """PEFT's rank_pattern / alpha_pattern give modules their own rank and alpha (keys matched against the end of the
    module's name from a dot on, the first in the config's order winning): each module's factors have its rank and its
    own scaling, and a batch mixing the adapter with the base equals PEFT."""
    from tokenmill.model.lora import read_adapter
    from tokenmill.model.model_config import ModelConfig

    root, cases, refs = lora_case
    ranks = {r"layers\.1\.self_attn\.q_proj": 2, "q_proj": 6, "down_proj": 12}
    alphas = {"v_proj": 3, r"model\.layers\.0\.mlp\.down_proj": 40, "proj": 99}  # "proj" matches no module
    peft = save_lora_adapter(root / "base", tmp_path / "p", 4, 8, ["q_proj", "v_proj", "down_proj"], rslora, seed=21,
                             rank_pattern=ranks, alpha_pattern=alphas)
    mc = ModelConfig.from_hf_dict(json.loads((root / "base" / "config.json").read_text()))
    ad = read_adapter("p", tmp_path / "p", mc)
    want_rank = {(0, "q_proj"): 6, (1, "q_proj"): 2, (0, "v_proj"): 4, (0, "down_proj"): 12}
    assert {k: fa.shape[0] for k, (fa, _) in ad.factors.items() if k in want_rank} == want_rank
    assert ad.rank == 12
    from safetensors.torch import load_file

    raw = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    for (layer, target), alpha in (((0, "v_proj"), 3), ((0, "down_proj"), 40), ((1, "down_proj"), 8)):
        group = "self_attn" if target == "v_proj" else "mlp"
        b = raw[f"base_model.model.model.layers.{layer}.{group}.{target}.lora_B.weight"]
        r = b.shape[1]
        torch.testing.assert_close(ad.factors[(layer, target)][1], b * (alpha / (r ** 0.5 if rslora else r)))
    llm = LLM(str(root / "base"), lora_adapters={"p": str(tmp_path / "p")}, block_size=4, num_kv_blocks=96,
              max_num_batched_tokens=48, prefill_chunk_size=7, max_num_seqs=16)
    mine = [(p, "p" if i % 2 else None) for i, p in enumerate(dict.fromkeys(tuple(p) for p, _ in cases))]
    outs = llm.generate([list(p) for p, _ in mine], [SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True,
                                                                    lora=n) for _, n in mine], use_tqdm=False)
    for (p, n), out in zip(mine, outs):
        want = hf_greedy(peft, list(p), NEW) if n else refs[(p, None)]
        assert_greedy_equal(out.token_ids, *want, f"pattern adapter {n} prompt {p[:3]}")


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
