"""GGUF files of the mixtures of experts (Mixtral as llama with experts, Qwen2-MoE) and of Gemma 2 / 3: written here
from a tiny transformers model in llama.cpp's layout (stacked [experts, rows, cols] expert tensors, Q/K rows
permuted for llama, Gemma's norms stored as 1 + w), with the default model's tokenizer metadata; loaded by tokenmill
and held to the transformers model they were written from."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy
from tokenmill import LLM, SamplingParams

VOCAB = 49152  # the default model's tokenizer, whose metadata the files borrow


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp's convert: rotate-half rows -> interleaved
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                               sliding_window=None)
    elif arch == "olmoe":  # q/k norms over all heads, clipped q/k/v, top-k weights not renormalised
        cfg = tf.OlmoeConfig(**common, intermediate_size=64, num_experts=4, num_experts_per_tok=2, clip_qkv=0.4)
    elif arch == "qwen3_moe":  # q/k norms per head, no shared expert, top-k renormalised (as llama.cpp runs it)
        cfg = tf.Qwen3MoeConfig(**common, head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                                num_experts_per_tok=2, norm_topk_prob=True)
    else:
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64,
                                shared_expert_intermediate_size=96, num_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _writer(path, arch: str, cfg):
    """A GGUF writer for ``arch`` with the default model's tokenizer metadata and the keys every file here has."""
    import gguf

    from tokenmill.model.gguf_convert import copy_tokenizer_fields
    from tokenmill.model.loader import default_model_path

    w = gguf.GGUFWriter(str(path), arch)
    copy_tokenizer_fields(gguf.GGUFReader(str(default_model_path())), w)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    return w


def _finish(w, tensors: dict, qtype: str = "F32") -> None:
    """Writes ``tensors`` (float, or the layers' matrices in ``qtype`` blocks) and closes the file."""
    import gguf

    q = gguf.GGMLQuantizationType[qtype]
    for name, t in tensors.items():
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype != "F32" and name.startswith("blk.") and t.ndim >= 2:
            data = gguf.quantize(t, q)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_moe_gguf(model, path, arch: str, qtype: str = "F32") -> None:
    cfg = model.config
    w = _writer(path, {"mixtral": "llama", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}.get(arch, "qwen2moe"), cfg)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    if arch == "olmoe":
        w.add_clamp_kqv(cfg.clip_qkv)
    elif arch != "mixtral":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        else:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"],
               "output.weight": sd["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        qw, kw = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if arch == "mixtral":
            qw, kw = _permute(qw, heads), _permute(kw, kv)
        tensors.update({b + "attn_norm.weight": sd[p + "input_layernorm.weight"],
                        b + "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                        b + "attn_q.weight": qw, b + "attn_k.weight": kw, b + "attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                        b + "attn_output.weight": sd[p + "self_attn.o_proj.weight"]})
        if arch == "qwen2_moe":
            for t in "qkv":
                tensors[b + f"attn_{t}.bias"] = sd[p + f"self_attn.{t}_proj.bias"]
        if arch in ("qwen3_moe", "olmoe"):
            tensors[b + "attn_q_norm.weight"] = sd[p + "self_attn.q_norm.weight"]
            tensors[b + "attn_k_norm.weight"] = sd[p + "self_attn.k_norm.weight"]
        moe = "mlp."
        gu, down = sd[p + moe + "experts.gate_up_proj"], sd[p + moe + "experts.down_proj"]  # [E, 2I, h], [E, h, I]
        half = gu.shape[1] // 2
        tensors.update({b + "ffn_gate_inp.weight": sd[p + moe + "gate.weight"],
                        b + "ffn_gate_exps.weight": np.ascontiguousarray(gu[:, :half]),
                        b + "ffn_up_exps.weight": np.ascontiguousarray(gu[:, half:]),
                        b + "ffn_down_exps.weight": down})
        if arch == "qwen2_moe":
            tensors.update({b + "ffn_gate_shexp.weight": sd[p + moe + "shared_expert.gate_proj.weight"],
                            b + "ffn_up_shexp.weight": sd[p + moe + "shared_expert.up_proj.weight"],
                            b + "ffn_down_shexp.weight": sd[p + moe + "shared_expert.down_proj.weight"],
                            b + "ffn_gate_inp_shexp.weight": sd[p + moe + "shared_expert_gate.weight"][0]})
    _finish(w, tensors, qtype)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_a_moe_gguf_equals_the_model_it_was_written_from(tmp_path, arch, cache_dir):
    hf = _tiny(arch)
    write_moe_gguf(hf, tmp_path / "m.gguf", arch)
    llm = LLM(str(tmp_path / "m.gguf"), kv_cache_memory=0.05, cache_dir=cache_dir, block_size=4,
              max_num_batched_tokens=48, prefill_chunk_size=7)
    assert llm.engine.model_config.num_experts == 4 and llm.engine.model_config.is_moe
    if arch == "olmoe":  # transformers has no GGUF mapping for OLMoE: its tokenizer came through a stand-in file
        from transformers import AutoTokenizer

        from tokenmill.model.loader import default_model_path

        src = default_model_path()
        ref = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        text = "Summarise: the mill grinds 1,000 rows an hour."
        assert llm.engine.tokenizer.encode(text) == ref.encode(text)
        assert llm.engine.model_config.clip_qkv == pytest.approx(0.4)  # a float32 in the file
    rng = random.Random(2)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, (out, p) in enumerate(zip(llm.generate(prompts, params, use_tqdm=False), prompts)):
        assert_greedy_equal(out.token_ids, *hf_greedy(hf, p, 8), f"{arch} GGUF prompt {i}")


def test_q4_0_experts_load_as_their_blocks(tmp_path, cache_dir):
    """Under int4 each expert (and every other layer matrix) holds the file's Q4_0 blocks, no rounding on top: the
    log-probabilities follow the float model of the same file within the int4 kernels' bfloat16 inputs."""
    write_moe_gguf(_tiny("mixtral"), tmp_path / "q.gguf", "mixtral", "Q4_0")
    ids = [(7 * i + 3) % 5000 + 100 for i in range(40)]
    ref = torch.tensor(LLM(str(tmp_path / "q.gguf"), kv_cache_memory=0.05, cache_dir=cache_dir).engine.score(ids))
    llm = LLM(str(tmp_path / "q.gguf"), quantization="int4", kv_cache_memory=0.05, cache_dir=cache_dir)
    from tokenmill.model.weight_only import Int4Weight

    assert isinstance(llm.engine.runner.model.layers[0].mlp.experts[3].down_proj.quantized, Int4Weight)
    ours = torch.tensor(llm.engine.score(ids))
    assert (ours - ref).abs().mean() < 0.02, (ours - ref).abs().mean()


def _tiny_gemma(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=256,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=8)
    if arch == "gemma2":  # llama.cpp's pattern: sliding layers alternate
        cfg = tf.Gemma2Config(**common, num_hidden_layers=2, attn_logit_softcapping=2.0, final_logit_softcapping=5.0)
    else:  # every 6th layer global; sliding layers' RoPE theta 10,000
        cfg = tf.Gemma3TextConfig(**common, num_hidden_layers=6, sliding_window_pattern=6)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def write_gemma_gguf(model, path, arch: str) -> None:
    cfg = model.config
    w = _writer(path, arch, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"] + 1}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            key = f"model.layers.{i}.{ours}.weight"
            if key in sd:
                tensors[f"blk.{i}.{theirs}.weight"] = sd[key] + 1 if "norm" in ours else sd[key]
    _finish(w, tensors)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_a_gemma_gguf_equals_the_model_it_was_written_from(tmp_path, arch, cache_dir):
    """Norms back from 1 + w, the softcaps, the window and its layer pattern, the attention scale and Gemma 3's
    local RoPE all come from the file's metadata as llama.cpp reads them; prompts longer than the 8-token window."""
    hf = _tiny_gemma(arch)
    write_gemma_gguf(hf, tmp_path / "g.gguf", arch)
    llm = LLM(str(tmp_path / "g.gguf"), kv_cache_memory=0.05, cache_dir=cache_dir, block_size=4,
              max_num_batched_tokens=48, prefill_chunk_size=7)
    mc = llm.engine.model_config
    assert mc.norm_plus_one and mc.window_of(0) == 8 and mc.window_of(mc.num_hidden_layers - 1) is None
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(6)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    for i, (out, p) in enumerate(zip(llm.generate(prompts, params, use_tqdm=False), prompts)):
        assert_greedy_equal(out.token_ids, *hf_greedy(hf, p, 8), f"{arch} GGUF prompt {i}")
    ids = [(7 * i + 3) % 5000 + 100 for i in range(30)]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    ref = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(llm.engine.score(ids)), ref, rtol=0, atol=1e-4)
