"""`tokenmill serve --lora`: a request's model names the adapter it runs with (as vLLM serves adapters), /v1/models
lists the adapters, and an unknown model is a 400."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import hf_greedy, save_lora_adapter, save_tiny_model
from test_server import KEY, Server, request


@pytest.fixture(scope="module")
def lora_server(cli_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-serve")
    save_tiny_model("llama", root / "base")
    peft = save_lora_adapter(root / "base", root / "qv", 4, 8, ["q_proj", "v_proj"], False, seed=3)
    s = Server(cli_env, "--model", root / "base", "--api-key", KEY, "--lora", f"qv={root / 'qv'}",
               "--kv-cache-memory", "0.05")
    yield s, root, peft
    s.stop()


def test_a_request_runs_with_the_adapter_its_model_names(lora_server):
    from transformers import AutoModelForCausalLM

    server, root, peft = lora_server
    prompt = [5, 17, 33, 2, 90, 41]
    base = AutoModelForCausalLM.from_pretrained(str(root / "base"), dtype=torch.float32).eval()
    status, _, payload = request(server.port, "GET", "/v1/models")
    assert status == 200 and {"qv", "base"} <= {m["id"] for m in json.loads(payload)["data"]}
    got = {}
    for model in ("qv", "base"):
        status, _, payload = request(server.port, "POST", "/v1/completions",
                                     {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                      "ignore_eos": True})
        assert status == 200, payload
        body = json.loads(payload)
        assert body["model"] == model
        got[model] = body["choices"][0]["text"]
    from tokenmill.model.loader import load_tokenizer

    tok = load_tokenizer(root / "base")
    assert got["qv"] == tok.decode(hf_greedy(peft, prompt, 8)[0], skip_special_tokens=True)
    assert got["base"] == tok.decode(hf_greedy(base, prompt, 8)[0], skip_special_tokens=True)
    assert got["qv"] != got["base"]
    status, _, payload = request(server.port, "POST", "/v1/completions", {"model": "nope", "prompt": prompt})
    assert status == 400 and b"model_not_found" in payload
