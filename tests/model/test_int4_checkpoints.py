"""GPTQ and AWQ checkpoints: written here in each format's layout (packers written from the formats' descriptions,
independently of tokenmill's unpacking), loaded straight into the int4 path and held equal to the float model of the
same dequantized weights."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.model.int4_checkpoints import Int4CheckpointError, to_groups
from tokenmill.model.weight_only import Int4Weight

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's packer: code i of each int32 holds column AWQ_ORDER[i] of its 8


def _int32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.uint32).view(np.int32))


def pack_gptq_rows(q: np.ndarray) -> torch.Tensor:  # [K, N] codes -> [K/8, N]: code i of row r is row 8r + i
    out = np.zeros((q.shape[0] // 8, q.shape[1]), dtype=np.uint64)
    for i in range(8):
        out |= q[i::8].astype(np.uint64) << np.uint64(4 * i)
    return _int32(out)


def pack_columns(q: np.ndarray, awq: bool) -> torch.Tensor:  # [R, C] codes -> [R, C/8]
    out = np.zeros((q.shape[0], q.shape[1] // 8), dtype=np.uint64)
    for c in range(q.shape[1] // 8):
        for i in range(8):
            col = 8 * c + (AWQ_ORDER[i] if awq else i)
            out[:, c] |= q[:, col].astype(np.uint64) << np.uint64(4 * i)
    return _int32(out)


def quantize(w: torch.Tensor, group: int, perm: torch.Tensor | None, rng: np.random.Generator):
    """A float [N, K] weight -> (codes [K, N], zeros [G, N], float16 scales [G, N], g_idx [K]) whose dequantization
    is close to w. Scales are powers of two, so every product below is exact in float16 / bfloat16 too; zeros in
    1..15 (the classic GPTQ format cannot store 0)."""
    n, k = w.shape
    order = torch.arange(k) if perm is None else perm  # act-order: channel order[j] is the j-th quantized
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // group
    groups = k // group
    q = np.zeros((k, n), dtype=np.int64)
    z = np.zeros((groups, n), dtype=np.int64)
    s = np.zeros((groups, n), dtype=np.float32)
    wt = w.t().numpy()
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten().numpy()
        lo, hi = wt[cols].min(0), wt[cols].max(0)
        scale = np.exp2(np.ceil(np.log2(np.maximum((hi - lo) / 14, 1e-6))))
        zero = np.clip(np.round(-lo / scale) + 1, 1, 15)
        q[cols] = np.clip(np.round(wt[cols] / scale) + zero, 0, 15)
        z[g], s[g] = zero, scale
    return q, z, torch.from_numpy(s).half(), g_idx.to(torch.int32)


def dequantized(q, z, s, g_idx) -> torch.Tensor:  # the format's own formula, in the checkpoint's layout -> [N, K]
    g = g_idx.long()
    return ((torch.from_numpy(q) - torch.from_numpy(z)[g]).float() * s.float()[g]).t().contiguous()


def layer_tensors(method: str, q, z, s, g_idx, v2: bool = False) -> dict[str, torch.Tensor]:
    if method == "awq":
        return {"qweight": pack_columns(q, True), "qzeros": pack_columns(z, True), "scales": s}
    zeros = z if v2 else z - 1  # the classic format stores z - 1
    return {"qweight": pack_gptq_rows(q), "qzeros": pack_columns(zeros, False), "scales": s, "g_idx": g_idx}


CASES = [("gptq", 32, False, False), ("gptq", 64, True, False), ("gptq", 128, True, True), ("gptq", -1, False, False),
         ("awq", 64, False, False), ("awq", 128, False, False)]


@pytest.mark.parametrize("method,group,act_order,v2", CASES)
def test_each_layout_loads_the_weight_it_packs_exactly(method, group, act_order, v2):
    """Unpacked groups dequantize to the format's own formula bit for bit, and the int4 layer fed the identity gives
    back exactly that weight (powers-of-two scales: nothing rounds), act-order's permutation included."""
    rng = np.random.default_rng(abs(group) + 7 * act_order)
    n, k = 48, 256
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)) * 0.05
    g = k if group == -1 else group
    perm = torch.from_numpy(rng.permutation(k)) if act_order else None
    q, z, s, g_idx = quantize(w, g, perm, rng)
    t = layer_tensors(method, q, z, s, g_idx, v2)
    settings = {"method": method, "group_size": group, "desc_act": act_order,
                "zero_offset": 0 if method == "awq" or v2 else 1}
    groups = to_groups("x", t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), settings)
    ref = dequantized(q, z, s, g_idx)
    assert (groups.perm is not None) == act_order
    assert torch.equal(groups.dequantize(), ref)
    layer = Int4Weight(n, k)
    layer.load_rows(0, groups)
    layer.finalize(torch.float32)
    assert torch.equal(layer(torch.eye(k), None), ref.t())


def test_malformed_layers_are_one_clear_error():
    rng = np.random.default_rng(0)
    q, z, s, g_idx = quantize(torch.randn(16, 64), 32, None, rng)
    t = layer_tensors("gptq", q, z, s, g_idx)
    ok = {"method": "gptq", "group_size": 32, "desc_act": False, "zero_offset": 1}
    with pytest.raises(Int4CheckpointError, match="do not fit one 64 x 16 weight in groups of 64"):
        to_groups("l", t["qweight"], t["qzeros"], t["scales"], None, {**ok, "group_size": 64})
    with pytest.raises(Int4CheckpointError, match="l.qweight must be a 2-D int32"):
        to_groups("l", t["qweight"].float(), t["qzeros"], t["scales"], None, ok)
    with pytest.raises(Int4CheckpointError, match="every group must hold 32"):
        to_groups("l", t["qweight"], t["qzeros"], t["scales"], torch.zeros(64, dtype=torch.int32).index_fill_(
            0, torch.tensor([3]), 1), ok)


# ------------------------------------------------------------------ whole checkpoints
def write_checkpoint(src, dst, method: str, group: int, act_order: bool, seed: int = 0) -> None:
    """``dst``: ``src``'s model with every decoder linear in ``method``'s 4-bit layout (one act-order permutation per
    input: q/k/v share one, gate/up another); ``dst``-float: the same dequantized weights as a float checkpoint."""
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    state = load_file(str(src / "model.safetensors"))
    quantized, floats = {}, {}
    perms: dict[str, torch.Tensor | None] = {}
    for name, w in state.items():
        proj = name.rsplit(".", 2)[-2] if name.endswith(".weight") else ""
        if ".layers." not in name or not proj.endswith("_proj"):
            quantized[name] = floats[name] = w
            continue
        shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}.get(proj, proj)
        key = name.rsplit(".", 2)[0] + "." + shared
        if key not in perms:
            perms[key] = torch.from_numpy(rng.permutation(w.shape[1])) if act_order else None
        q, z, s, g_idx = quantize(w, w.shape[1] if group == -1 else group, perms[key], rng)
        floats[name] = dequantized(q, z, s, g_idx)
        for part, t in layer_tensors(method, q, z, s, g_idx).items():
            quantized[name.removesuffix(".weight") + "." + part] = t
    for path, tensors, qcfg in ((dst, quantized, True), (dst.with_name(dst.name + "-float"), floats, False)):
        shutil.copytree(src, path)
        (path / "model.safetensors").unlink()
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((path / "config.json").read_text())
        if qcfg:
            cfg["quantization_config"] = ({"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                                           "sym": False, "checkpoint_format": "gptq"} if method == "gptq" else
                                          {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                           "version": "gemm"})
        (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("arch,method,group,act_order", [("llama", "gptq", 64, True), ("qwen2", "awq", 128, False),
                                                         ("qwen2_moe", "gptq", 32, False)])
def test_a_checkpoint_runs_as_its_dequantized_float_model(tmp_path, arch, method, group, act_order):
    """The checkpoint loads as int4 (asked for or not) holding the file's codes; its log-probabilities follow the
    float model of the dequantized weights within the bfloat16 rounding of the layers' inputs, and its greedy tokens
    equal transformers' on that float model, alone and in a busy chunked batch."""
    sizes = dict(hidden_size=128, intermediate_size=256) if arch != "qwen2_moe" else dict(hidden_size=128)
    save_tiny_model(arch, tmp_path / "src", **sizes)
    write_checkpoint(tmp_path / "src", tmp_path / "q", method, group, act_order)
    llm = LLM(str(tmp_path / "q"), kv_cache_memory=0.05, block_size=4, max_num_batched_tokens=48, prefill_chunk_size=7)
    assert llm.engine.config.quantization == "int4"
    model = llm.engine.runner.model
    layer = model.layers[-1].self_attn.qkv_proj
    assert isinstance(layer.quantized, Int4Weight) and (layer.quantized.perm is not None) == act_order
    ids = [(5 * i + 1) % 200 + 3 for i in range(40)]
    ref = torch.tensor(LLM(str(tmp_path / "q-float"), kv_cache_memory=0.05).engine.score(ids))
    ours = torch.tensor(llm.engine.score(ids))
    assert (ours - ref).abs().mean() < 0.02, (ours - ref).abs().mean()

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q-float"), dtype=torch.float32).eval()
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, (out, p) in enumerate(zip(llm.generate(prompts, params, use_tqdm=False), prompts)):
        ref_tokens, ref_logits = hf_greedy(hf, p, 8)
        assert_greedy_equal(out.token_ids, ref_tokens, ref_logits, f"{arch} {method} prompt {i}", tie=0.05)


def test_bad_checkpoints_are_one_clear_error(tmp_path):
    save_tiny_model("llama", tmp_path / "src", hidden_size=128, intermediate_size=256)
    write_checkpoint(tmp_path / "src", tmp_path / "q", "gptq", 64, True)

    def with_config(**changes):
        cfg = json.loads((tmp_path / "q" / "config.json").read_text())
        cfg["quantization_config"].update(changes)
        (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(ValueError, match="runs as quantization int4 .* not int8"):
        LLM(str(tmp_path / "q"), quantization="int8", kv_cache_memory=0.05)
    with_config(bits=8)
    with pytest.raises(ValueError, match="bits=8: tokenmill reads 4-bit ones only"):
        LLM(str(tmp_path / "q"), kv_cache_memory=0.05)
    with_config(bits=4, group_size=16)
    with pytest.raises(ValueError, match="group_size=16"):
        LLM(str(tmp_path / "q"), kv_cache_memory=0.05)
    with_config(group_size=64, quant_method="bitsandbytes")
    with pytest.raises(ValueError, match="'bitsandbytes' is not supported"):
        LLM(str(tmp_path / "q"), kv_cache_memory=0.05)
    with_config(quant_method="gptq")
    # q/k/v with different act-order permutations cannot share their input
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.g_idx"
    state[name] = state[name].roll(1)
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(ValueError, match="different input channel orders"):
        LLM(str(tmp_path / "q"), kv_cache_memory=0.05)
    del state[name.replace("g_idx", "qzeros")]
    save_file(state, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.k_proj' lacks qzeros"):
        LLM(str(tmp_path / "q"), kv_cache_memory=0.05)
