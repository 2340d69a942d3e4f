"""n and best_of (engine/parallel_sampling.py): a request's samples share its prompt's KV through the prefix cache
(the prompt is prefilled once), seeded samples are reproducible and independent of the batch, best_of keeps the n
samples with the highest mean logprob per token, and an aborted request leaves nothing behind."""

import random

import pytest

from helpers import save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.engine.parallel_sampling import sample_seed


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("ps") / "m"
    save_tiny_model("llama", path)
    return LLM(str(path), max_num_batched_tokens=64, max_num_seqs=8, num_kv_blocks=256, block_size=4)


def test_greedy_n_gives_n_equal_samples_and_prefills_the_prompt_once(llm):
    prompt = list(range(3, 41))  # 38 tokens: 9 full blocks of 4 are shared, the last 2 tokens computed per sample
    one = llm.generate([prompt], SamplingParams(max_tokens=7, temperature=0.0), use_tqdm=False)[0]
    llm.engine.reset_prefix_cache()
    before = llm.engine.num_prompt_tokens_done
    out = llm.generate([prompt], SamplingParams(max_tokens=7, temperature=0.0, n=4), use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(o.token_ids == one.token_ids for o in out.outputs)
    assert out.num_completion_tokens == 4 * len(one.token_ids) == out.num_generated_tokens
    hit_tokens = (len(prompt) - 1) // 4 * 4
    assert llm.engine.num_prompt_tokens_done - before == len(prompt) + 3 * (len(prompt) - hit_tokens)
    assert not llm.engine.has_unfinished_requests() and llm.engine.kv_cache_manager.num_held_blocks() == 0


def test_seeded_samples_are_reproducible_distinct_and_batch_independent(llm):
    rng = random.Random(5)
    prompt = [rng.randrange(3, 256) for _ in range(21)]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=123, n=3)
    alone = llm.generate([prompt], params, use_tqdm=False)[0]
    assert len({tuple(o.token_ids) for o in alone.outputs}) > 1  # the samples differ
    first = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=123), use_tqdm=False)[0]
    assert alone.outputs[0].token_ids == first.token_ids  # sample 0 keeps the seed: n = 1 gives the first sample
    third = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=sample_seed(123, 2)),
                         use_tqdm=False)[0]
    assert alone.outputs[2].token_ids == third.token_ids
    others = [[rng.randrange(3, 256) for _ in range(rng.randint(3, 50))] for _ in range(7)]
    busy = llm.generate(others[:4] + [prompt] + others[4:],
                        [SamplingParams(max_tokens=9, temperature=0.7, n=2)] * 4 + [params]
                        + [SamplingParams(max_tokens=5, temperature=0.0)] * 3, use_tqdm=False)
    assert [o.token_ids for o in busy[4].outputs] == [o.token_ids for o in alone.outputs]
    assert [len(b.outputs) for b in busy] == [2] * 4 + [3] + [1] * 3


def test_best_of_keeps_the_samples_with_the_highest_mean_logprob(llm):
    prompt = list(range(50, 70))
    drawn = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.2, seed=9, n=5, logprobs=0),
                         use_tqdm=False)[0]
    means = [o.cumulative_logprob / len(o.token_ids) for o in drawn.outputs]
    for o in drawn.outputs:
        assert o.cumulative_logprob == pytest.approx(sum(s[t] for s, t in zip(o.logprobs, o.token_ids)))
    best = sorted(range(5), key=lambda i: -means[i])[:2]
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=1.2, seed=9, n=2, best_of=5),
                       use_tqdm=False)[0]
    assert [o.token_ids for o in out.outputs] == [drawn.outputs[i].token_ids for i in best]
    assert [o.index for o in out.outputs] == [0, 1]
    assert all(o.logprobs is None for o in out.outputs)  # ranked on logprobs nobody asked to see
    assert out.num_completion_tokens < out.num_generated_tokens == sum(len(o.token_ids) for o in drawn.outputs)


def test_an_aborted_request_takes_all_its_samples_with_it(llm):
    engine = llm.engine
    engine.add_request("a", list(range(3, 30)), SamplingParams(max_tokens=50, temperature=1.0, n=3))
    engine.add_request("b", list(range(3, 12)), SamplingParams(max_tokens=3, temperature=0.0))
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request("a", [5, 6], SamplingParams())
    engine.step()
    assert engine.num_computed_tokens("a") > 0
    engine.abort_request(["a"])
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs] == ["b"]
    assert engine.kv_cache_manager.num_held_blocks() == 0
    engine.add_request("a", [5, 6], SamplingParams(max_tokens=1, n=2))  # the id is free again
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert len(outs[-1].outputs) == 2


def test_n_and_best_of_are_checked():
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match=r"best_of must be an integer in \[n, 128\]"):
        SamplingParams(n=3, best_of=2)
    assert SamplingParams(n=2, best_of=4).num_samples == 4 and SamplingParams(n=3).num_samples == 3
