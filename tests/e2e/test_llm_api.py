"""The offline LLM API on the real embedded model (and tiny models where a second model is needed)."""

import json

import pytest

from helpers import save_tiny_model
from tokenmill import LLM, ConfigError, SamplingParams

GREEDY8 = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_generate_returns_outputs_in_input_order_with_usage(smollm2):
    prompts = ["The capital of France is", "1, 2, 3,", "A short poem about rain:\n"]
    outs = smollm2.generate(prompts, GREEDY8, use_tqdm=False)
    singles = [smollm2.generate(p, GREEDY8, use_tqdm=False)[0] for p in prompts]
    for p, o, s in zip(prompts, outs, singles):
        assert o.prompt == p
        assert o.token_ids == s.token_ids
        assert o.num_completion_tokens == 8 and o.finish_reason == "length"
        assert o.num_prompt_tokens == len(smollm2.tokenizer(p).input_ids)
        assert o.text == smollm2.tokenizer.decode(o.token_ids, skip_special_tokens=True)


def test_sort_by_length_and_prefill_first_give_the_same_greedy_tokens(smollm2, cache_dir):
    prompts = ["Hi", "Tell me a very long story about a dragon and a knight who became friends", "2+2=", "Why"]
    base = [o.token_ids for o in smollm2.generate(prompts, GREEDY8, use_tqdm=False)]
    for options in ({"sort_by_length": True}, {"scheduling_strategy": "prefill_first"}, {"enable_chunked_prefill": False, "max_model_len": 512, "max_num_batched_tokens": 512}):
        llm = LLM(cache_dir=cache_dir, **options)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY8, use_tqdm=False)] == base, options


def test_chat_applies_template_and_stops_at_eos(smollm2):
    outs = smollm2.chat(
        [[{"role": "user", "content": "What is the capital of France? Answer in one word."}]],
        SamplingParams(max_tokens=64, temperature=0.0),
        use_tqdm=False,
    )
    assert "Paris" in outs[0].text
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == 2  # <|im_end|>
    assert outs[0].prompt.startswith("<|im_start|>system")


def test_token_id_prompts(smollm2):
    ids = smollm2.tokenizer("The capital of France is").input_ids
    by_ids = smollm2.generate([ids], GREEDY8, use_tqdm=False)[0]
    by_text = smollm2.generate("The capital of France is", GREEDY8, use_tqdm=False)[0]
    assert by_ids.token_ids == by_text.token_ids and by_ids.prompt is None


def test_stop_strings_and_stop_token_ids(smollm2):
    free = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=20, temperature=0), use_tqdm=False)[0]
    assert " 7" in free.text
    stopped = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=20, temperature=0, stop=[" 7"]), use_tqdm=False)[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == " 7"
    assert stopped.text == free.text[: free.text.index(" 7")]
    # the stop string completed by the very last token max_tokens allows: "stop" (text cut), not "length"
    decode = smollm2.tokenizer.decode
    n_upto = next(n for n in range(1, 21) if " 7" in decode(free.token_ids[:n], skip_special_tokens=True))
    at_limit = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=n_upto, temperature=0, stop=[" 7"]),
                                use_tqdm=False)[0]
    assert at_limit.finish_reason == "stop" and at_limit.stop_reason == " 7", at_limit
    assert at_limit.text == stopped.text and len(at_limit.token_ids) == n_upto
    tok = free.token_ids[3]
    by_id = smollm2.generate("1, 2, 3, 4,", SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[tok]), use_tqdm=False)[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == tok
    assert by_id.token_ids == free.token_ids[: free.token_ids.index(tok) + 1]


def test_logprobs(smollm2):
    out = smollm2.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0, logprobs=3), use_tqdm=False)[0]
    assert len(out.logprobs) == 4
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and len(entry) in (3, 4)
        assert entry[tok] == max(entry.values())  # greedy picks the most likely token
        assert all(v <= 0 for v in entry.values())


def test_seeded_sampling_is_reproducible_across_batch_compositions(smollm2):
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = smollm2.generate("Write a sentence about the moon.", seeded, use_tqdm=False)[0].token_ids
    others = ["Hello there", "List some fruits:", "Once upon a time"]
    batch = smollm2.generate(
        others + ["Write a sentence about the moon."] + others,
        [SamplingParams(max_tokens=20, temperature=1.0)] * 3 + [seeded] + [SamplingParams(max_tokens=5, seed=7, temperature=1.0)] * 3,
        use_tqdm=False,
    )
    assert batch[3].token_ids == alone
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=99, ignore_eos=True)
    assert smollm2.generate("Write a sentence about the moon.", other_seed, use_tqdm=False)[0].token_ids != alone


def test_invalid_inputs_are_all_named_before_any_compute(smollm2):
    too_long = [5] * 9000
    with pytest.raises(ValueError) as e:
        smollm2.generate(
            ["fine", "", too_long, "also fine", [10**7]],
            [GREEDY8, GREEDY8, GREEDY8, {"temperature": -1.0}, GREEDY8],
            use_tqdm=False,
        )
    msg = str(e.value)
    assert "[1] empty prompt" in msg and "[2] prompt has 9000 tokens" in msg
    assert "[3]" in msg and "temperature" in msg and "[4]" in msg and "vocabulary" in msg
    assert "[0]" not in msg
    assert not smollm2.engine.has_unfinished_requests()


def test_kv_budget_too_small_says_what_it_needs(cache_dir):
    with pytest.raises(ConfigError, match=r"needs 512 blocks"):
        LLM(cache_dir=cache_dir, kv_cache_memory=0.01)


def test_unknown_option_and_unknown_architecture(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="max_num_seq"):
        LLM(cache_dir=cache_dir, max_num_seq=4)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        LLM(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path / "nope"))


def test_bfloat16_runs(tmp_path):
    save_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), dtype="bfloat16", kv_cache_memory=0.01)
    assert llm.engine.dtype.is_floating_point and str(llm.engine.dtype) == "torch.bfloat16"
    out = llm.generate([[5, 6, 7, 8]], GREEDY8, use_tqdm=False)[0]
    assert len(out.token_ids) == 8
