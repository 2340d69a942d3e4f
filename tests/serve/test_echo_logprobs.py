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
