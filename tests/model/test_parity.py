"""Greedy parity with transformers in float32: every prompt alone, and inside a busy batch with a 7-token prefill
chunk and a KV pool small enough to force recompute preemption."""

import random

import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy, save_tiny_model
from tokenmill import LLM, SamplingParams

ARCHS = ["llama", "llama3_tied", "mistral", "mistral_window", "qwen2", "qwen3", "phi3", "phi3_longrope", "gemma2", "gemma3", "gemma3_mm", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny_model(request.param, path)
    rng = random.Random(hash(request.param) % 1000)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 60))] for _ in range(24)]
    refs = [hf_greedy(hf_model, p, NEW_TOKENS) for p in prompts]
    return request.param, str(path), prompts, refs


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def test_tiny_alone(tiny):
    arch, path, prompts, refs = tiny
    llm = LLM(path, kv_cache_memory=0.05)
    for i, (p, (ref, ref_logits)) in enumerate(zip(prompts, refs)):
        out = llm.generate([p], GREEDY, use_tqdm=False)[0]
        assert_greedy_equal(out.token_ids, ref, ref_logits, f"{arch} prompt {i} alone")


@pytest.mark.parametrize("backend", ["auto", "cpu_kernel", "torch", "reference"])
def test_tiny_in_busy_batch_with_chunks_and_preemption(tiny, backend):
    arch, path, prompts, refs = tiny
    llm = LLM(
        path,
        block_size=4,
        num_kv_blocks=48,  # 192 slots for ~1,000 tokens of work: forces recompute preemption
        max_model_len=128,
        max_num_seqs=32,
        max_num_batched_tokens=64,
        prefill_chunk_size=7,
        preemption_mode="recompute",
        attention_backend=backend,
    )
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0, "the pool was meant to be small enough to preempt"
    for i, (out, (ref, ref_logits)) in enumerate(zip(outs, refs)):
        assert_greedy_equal(out.token_ids, ref, ref_logits, f"{arch}/{backend} prompt {i} in batch")


@pytest.mark.parametrize("swap_space", [1e-3, 1.5e-5])  # every victim fits; only some do (the rest recompute)
def test_tiny_in_busy_batch_with_swap_preemption(tiny, swap_space):
    """preemption_mode="swap": victims' K/V copied to host blocks and back; greedy tokens still transformers'."""
    arch, path, prompts, refs = tiny
    llm = LLM(path, block_size=4, num_kv_blocks=48, max_model_len=128, max_num_seqs=32, max_num_batched_tokens=64,
              prefill_chunk_size=7, preemption_mode="swap", swap_space=swap_space)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    st = llm.engine.stats
    assert st.num_swap_outs > 0, "the pool was meant to be small enough to swap"
    if swap_space < 1e-4:
        assert st.num_preemptions > st.num_swap_outs, "a swap space this small recomputes some victims"
    assert llm.engine.kv_cache_manager.swap_pool.num_free_blocks == llm.engine.num_swap_blocks
    for i, (out, (ref, ref_logits)) in enumerate(zip(outs, refs)):
        assert_greedy_equal(out.token_ids, ref, ref_logits, f"{arch} prompt {i} in batch (swap {swap_space} GiB)")


def test_tiny_batch_without_preemption(tiny):
    arch, path, prompts, refs = tiny
    llm = LLM(path, block_size=4, num_kv_blocks=48, max_model_len=128, max_num_batched_tokens=64, prefill_chunk_size=7)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.stats.num_preemptions == 0
    for i, (out, (ref, ref_logits)) in enumerate(zip(outs, refs)):
        assert_greedy_equal(out.token_ids, ref, ref_logits, f"{arch} prompt {i} in batch (preemption none)")


# ---------------------------------------------------------------- the real model
QUESTIONS = [
    "What is 2+2?",
    "Tell me about dogs.",
    "Write a limerick about a cat who learned to code in Python and became famous.",
    "Why?",
    "List the planets of the solar system in order from the sun, with one fact about each.",
    "Translate to French: The weather is lovely today and we are going to the beach.",
]
RAW = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):\n",
    "1, 2, 3, 5, 8, 13,",
]
REAL_NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2_cases(smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    texts = [smollm2.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS] + RAW
    prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    # dozens of prompts of mixed lengths: repeat with distinct suffixes
    prompts = prompts + [p + tok(f" (variant {k})", add_special_tokens=False).input_ids for k, p in enumerate(prompts)]
    prompts = prompts + [p[: max(1, len(p) // 3)] for p in prompts[:12]]
    refs = [hf_greedy(smollm2_hf, p, REAL_NEW_TOKENS) for p in prompts]
    return prompts, refs


def test_smollm2_alone(smollm2, smollm2_cases):
    prompts, refs = smollm2_cases
    params = SamplingParams(max_tokens=REAL_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i in range(len(QUESTIONS) + len(RAW)):
        out = smollm2.generate([prompts[i]], params, use_tqdm=False)[0]
        assert_greedy_equal(out.token_ids, refs[i][0], refs[i][1], f"SmolLM2 prompt {i} alone")


def test_smollm2_in_busy_batch_with_chunks_and_preemption(smollm2, smollm2_cases, cache_dir):
    prompts, refs = smollm2_cases
    llm = LLM(
        cache_dir=cache_dir,
        max_model_len=256,
        num_kv_blocks=20,  # 320 slots for ~2,000 tokens of work
        max_num_seqs=32,
        max_num_batched_tokens=96,
        prefill_chunk_size=7,
        preemption_mode="recompute",
    )
    params = SamplingParams(max_tokens=REAL_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert len(prompts) >= 24
    assert llm.engine.stats.num_preemptions > 0
    for i, (out, (ref, ref_logits)) in enumerate(zip(outs, refs)):
        assert_greedy_equal(out.token_ids, ref, ref_logits, f"SmolLM2 prompt {i} in batch")


def test_gguf_qk_unpermute_inverts_llama_cpp_permute():
    from tokenmill.model.gguf_weights import _unpermute_qk

    def llama_cpp_permute(w, n_head):  # as in llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(48, 10).numpy()
    assert (_unpermute_qk(llama_cpp_permute(w, 3), 3) == w).all()


@pytest.mark.parametrize("preemption", ["recompute", "none"])
def test_tiny_prefix_caching_equals_transformers(tiny, preemption):
    """Prompts sharing 9-, 23- and 40-token heads, and exact duplicates, with prefix caching on, in a busy batch
    with 7-token chunks (recompute: a pool small enough to preempt), run twice (the second time on a warm cache):
    greedy tokens equal transformers'."""
    from transformers import AutoModelForCausalLM

    arch, path, prompts, _ = tiny
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rng = random.Random(11)
    heads = [[rng.randrange(3, 256) for _ in range(n)] for n in (9, 23, 40)]
    cases = [heads[i % 3] + p[: rng.randint(1, 20)] for i, p in enumerate(prompts)]
    cases += [cases[4]] * 3 + [heads[2][:16], heads[2][:17]]  # duplicates; a prompt that is exactly 4 blocks
    refs = [hf_greedy(hf, c, NEW_TOKENS) for c in cases]
    llm = LLM(path, block_size=4, num_kv_blocks=48 if preemption == "recompute" else 96, max_model_len=128,
              max_num_seqs=32, max_num_batched_tokens=64, prefill_chunk_size=7, preemption_mode=preemption,
              enable_prefix_caching=True)
    for round_ in range(2):
        outs = llm.generate(cases, GREEDY, use_tqdm=False)
        for i, (out, (ref, ref_logits)) in enumerate(zip(outs, refs)):
            assert_greedy_equal(out.token_ids, ref, ref_logits, f"{arch} prefix-cached prompt {i} round {round_}")
    st = llm.engine.stats
    assert st.prefix_cache_hits > 0.3 * st.prefix_cache_queries, (st.prefix_cache_hits, st.prefix_cache_queries)
    if preemption == "recompute":
        assert llm.engine.stats.num_preemptions > 0


def test_gemma2_log_probabilities_follow_its_softcapped_logits(tmp_path):
    """Greedy tokens cannot see a final softcap (tanh is monotonic): the prompt's log-probabilities do."""
    hf = save_tiny_model("gemma2", tmp_path / "g")
    ids = [(7 * i + 3) % 250 + 3 for i in range(30)]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    ref = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    ours = torch.tensor(LLM(str(tmp_path / "g"), kv_cache_memory=0.05).engine.score(ids))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)
