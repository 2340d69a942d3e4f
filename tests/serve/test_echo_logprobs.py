"""`/v1/completions` with `echo` and `logprobs`, as lm-evaluation-harness's `local-completions` model sends it for
log-likelihoods (token-id prompts in a list, `echo: true, logprobs: 1, max_tokens: 1`, choices matched by index):
the prompt tokens' logprobs equal transformers' log-softmax on SmolLM2 in float32, the first one null, then the
generated token's. Also `max_tokens: 0` (score only), string prompts, and the bad-request cases."""

from __future__ import annotations

import json

import pytest
import torch

from test_server import KEY, Server, request


@pytest.fixture(scope="module")
def server(cli_env, smollm2):
    s = Server(cli_env, "--api-key", KEY, "--max-num-seqs", 4, "--max-model-len", 256)
    yield s
    s.stop()


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)  # [len, vocab]


def test_lm_eval_loglikelihood_request_shape(server, smollm2, smollm2_hf):
    tok = smollm2.tokenizer
    contexts = ["The capital of France is", "Two plus two equals"]
    conts = [" Paris", " four"]
    prompts = [tok.encode(c) + tok.encode(x) for c, x in zip(contexts, conts)]
    body = {"model": "x", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    body.pop("model")
    status, _, payload = request(server.port, "POST", "/v1/completions", body)
    assert status == 200, payload
    out = json.loads(payload)
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1]
    for ids, choice in zip(prompts, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the generated token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        ref = hf_logprobs(smollm2_hf, ids)
        for i in range(1, len(ids)):
            assert abs(lp["token_logprobs"][i] - ref[i - 1, ids[i]].item()) < 2e-4
            (top_tok, top_lp), = lp["top_logprobs"][i].items()  # logprobs: 1 -> the single most likely token
            assert abs(top_lp - ref[i - 1].max().item()) < 2e-4
        # the generated token: greedy, so its logprob is the top one
        assert abs(lp["token_logprobs"][-1] - ref[-1].max().item()) < 2e-4
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert out["usage"]["completion_tokens"] == 2


def test_score_only_echo_and_string_prompts(server, smollm2):
    text = "The quick brown fox jumps over the lazy dog"
    status, _, payload = request(server.port, "POST", "/v1/completions",
                                 {"prompt": text, "echo": True, "max_tokens": 0, "logprobs": 0})
    assert status == 200, payload
    out = json.loads(payload)
    choice = out["choices"][0]
    assert choice["text"] == text and out["usage"]["completion_tokens"] == 0
    ids = smollm2.tokenizer.encode(text)
    assert len(choice["logprobs"]["tokens"]) == len(ids) and choice["logprobs"]["token_logprobs"][0] is None
    assert all(v <= 0 for v in choice["logprobs"]["token_logprobs"][1:])
    # echo without logprobs: the prompt text, then the completion
    status, _, payload = request(server.port, "POST", "/v1/completions",
                                 {"prompt": text, "echo": True, "max_tokens": 3, "temperature": 0})
    c = json.loads(payload)["choices"][0]
    assert status == 200 and c["text"].startswith(text) and len(c["text"]) > len(text) and c["logprobs"] is None
    # two string prompts, one choice each, in order
    status, _, payload = request(server.port, "POST", "/v1/completions",
                                 {"prompt": ["Hello", "Goodbye"], "max_tokens": 2, "temperature": 0, "echo": True})
    out = json.loads(payload)
    assert status == 200 and [c["text"][:5] for c in out["choices"]] == ["Hello", "Goodb"]


def test_echo_bad_requests(server):
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "stream": True}, "echo"),
        ("/v1/completions", {"prompt": "hi", "echo": "yes"}, "echo"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": ["a", "b"], "stream": True}, "list of prompts"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 21}, "logprobs"),
    ]
    for path, body, needle in cases:
        status, _, payload = request(server.port, "POST", path, body)
        assert status == 400 and needle in json.loads(payload)["error"]["message"], (body, payload)


def test_n_and_best_of_choices(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Name a fruit."}]
    chat = c.chat.completions.create(model=c.models.list().data[0].id, messages=msgs, n=3, max_tokens=5,
                                     temperature=1.0, seed=11)
    assert [ch.index for ch in chat.choices] == [0, 1, 2] and len({ch.message.content for ch in chat.choices}) > 1
    again = c.chat.completions.create(model=chat.model, messages=msgs, n=3, max_tokens=5, temperature=1.0, seed=11)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in chat.choices]
    # streamed: each choice's deltas by index add up to the same texts, one finish chunk each
    texts, finishes = {}, {}
    for ch in c.chat.completions.create(model=chat.model, messages=msgs, n=3, max_tokens=5, temperature=1.0, seed=11,
                                        stream=True):
        for choice in ch.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = finishes.get(choice.index, []) + [choice.finish_reason]
    assert texts == {ch.index: ch.message.content for ch in chat.choices}
    assert finishes == {ch.index: [ch.finish_reason] for ch in chat.choices}
    # streamed with logprobs: per choice, the chunks' logprobs join into the non-streamed choice's
    kw = dict(model=chat.model, messages=msgs, n=2, max_tokens=6, temperature=1.0, seed=3, logprobs=True,
              top_logprobs=2)
    whole = c.chat.completions.create(**kw)
    joined = {}
    for ch in c.chat.completions.create(**kw, stream=True):
        for choice in ch.choices:
            if choice.logprobs is not None:
                joined.setdefault(choice.index, []).extend(choice.logprobs.content)
    for choice in whole.choices:
        assert [(t.token, round(t.logprob, 4), [a.token for a in t.top_logprobs]) for t in joined[choice.index]] == \
            [(t.token, round(t.logprob, 4), [a.token for a in t.top_logprobs]) for t in choice.logprobs.content]
    kw = dict(model=chat.model, prompt="Once upon a time", max_tokens=7, temperature=0, logprobs=1)
    whole = c.completions.create(**kw).choices[0].logprobs
    tokens, offsets = [], []
    for ch in c.completions.create(**kw, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            tokens += ch.choices[0].logprobs.tokens
            offsets += ch.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset
    # a list of prompts with n = 2: prompt p's choices are 2p and 2p + 1
    cmpl = c.completions.create(model=chat.model, prompt=["The sky is", "Grass is"], n=2, best_of=3, max_tokens=4,
                                temperature=1.0, seed=5)
    assert sorted(ch.index for ch in cmpl.choices) == [0, 1, 2, 3]
    greedy = c.completions.create(model=chat.model, prompt=["The sky is", "Grass is"], max_tokens=4, temperature=0,
                                  n=2)
    texts = {ch.index: ch.text for ch in greedy.choices}
    status, _, payload = request(server.port, "POST", "/v1/completions", {"prompt": "x", "n": 5})  # max_num_seqs 4
    assert status == 400 and "n=5 samples cannot run at once: max_num_seqs is 4" in json.loads(payload)["error"][
        "message"]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]


def test_vllm_prompt_logprobs_field(server, smollm2, smollm2_hf):
    ids = smollm2.tokenizer.encode("The capital of France is Paris")
    status, _, payload = request(server.port, "POST", "/v1/completions",
                                 {"prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 2})
    assert status == 200, payload
    [choice] = json.loads(payload)["choices"]
    rows = choice["prompt_logprobs"]
    assert len(rows) == len(ids) and rows[0] is None and choice["logprobs"] is None
    ref = hf_logprobs(smollm2_hf, ids)
    for i in range(1, len(ids)):
        row, want = rows[i], ref[i - 1]
        assert abs(row[str(ids[i])]["logprob"] - want[ids[i]].item()) < 2e-4
        assert row[str(ids[i])]["rank"] == int((want > want[ids[i]]).sum()) + 1
        top2 = want.topk(2).indices.tolist()
        assert {str(t) for t in top2} <= set(row) and row[str(top2[0])]["rank"] == 1
        assert row[str(top2[0])]["decoded_token"] == smollm2.tokenizer.decode([top2[0]])
    status, _, payload = request(server.port, "POST", "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                  "prompt_logprobs": 0})
    body = json.loads(payload)
    assert status == 200 and body["prompt_logprobs"][0] is None
    assert body["usage"]["prompt_tokens"] == len(body["prompt_logprobs"])
    assert all(len(r) == 1 for r in body["prompt_logprobs"][1:])  # K = 0: the token itself only
    for bad in ({"prompt": "x", "prompt_logprobs": 21}, {"prompt": "x", "prompt_logprobs": 1, "stream": True},
                {"prompt": "x", "n": 2, "best_of": 3, "stream": True, "prompt_logprobs": None}):
        status, _, payload = request(server.port, "POST", "/v1/completions", bad)
        message = json.loads(payload)["error"]["message"]
        assert status == 400 and ("prompt_logprobs" in message or "best_of > n cannot be streamed" in message), payload
