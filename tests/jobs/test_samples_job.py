"""n and best_of in jobs on SmolLM2: an OpenAI Batch line with n > 1 gets n choices (indexes 0..n-1, usage summed,
valid for the openai package's types), best_of keeps the best n by mean logprob per token, a seeded line's first
choice is the n = 1 line's answer, and a plain line gets ``completions`` / ``finish_reasons`` lists."""

from helpers import read_jsonl, write_jsonl

MSG = [{"role": "user", "content": "Write one word about the sea."}]


def chat(cid, **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": MSG, "max_completion_tokens": 6, **body}}


def test_openai_and_plain_lines_with_n_choices(tmp_path, run_cli):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    rows = [
        chat("one", temperature=0.9, seed=7),
        chat("three", temperature=0.9, seed=7, n=3),
        chat("greedy", temperature=0, n=2),
        {"custom_id": "best", "method": "POST", "url": "/v1/completions",
         "body": {"prompt": "The sea is", "max_tokens": 5, "temperature": 1.0, "seed": 3, "n": 2, "best_of": 5,
                  "logprobs": 1}},
        {"id": "plain", "prompt": "The sea is", "max_tokens": 4, "temperature": 0, "n": 2},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_cli("run", inp, "-o", out, "--quiet", check=0)
    recs = {r.get("custom_id", r.get("id")): r for r in read_jsonl(out)}
    one = ChatCompletion.model_validate(recs["one"]["response"]["body"])
    three = ChatCompletion.model_validate(recs["three"]["response"]["body"])
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == one.choices[0].message.content  # sample 0 keeps the seed
    assert len({c.message.content for c in three.choices}) > 1
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens > one.usage.completion_tokens
    greedy = ChatCompletion.model_validate(recs["greedy"]["response"]["body"])
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    best = Completion.model_validate(recs["best"]["response"]["body"])
    assert [c.index for c in best.choices] == [0, 1]
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in best.choices]
    assert means[0] >= means[1]  # best first
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in best.choices)
    plain = recs["plain"]
    assert "completion" not in plain and len(plain["completions"]) == 2 == len(plain["finish_reasons"])
    assert plain["completions"][0] == plain["completions"][1]
    # a second run of the finished job writes nothing twice
    run_cli("run", inp, "-o", out, "--quiet", check=0)
    assert len(read_jsonl(out)) == len(rows)
