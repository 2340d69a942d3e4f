"""`tokenmill eval`: the engine's scoring against transformers' log-probabilities (float32, tiny random models and
SmolLM2), perplexity over windows, greedy agreement, and the command end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import save_tiny_model
from tokenmill import LLM
from tokenmill.eval import greedy_agreement, perplexity


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_score_equals_transformers_log_probabilities(tmp_path, arch):
    hf = save_tiny_model(arch, tmp_path / arch)
    llm = LLM(str(tmp_path / arch), kv_cache_memory=0.05, block_size=4)
    ids = [(7 * i + 3) % 200 + 5 for i in range(61)]  # 61 tokens: many blocks, a partial last one
    ours = torch.tensor(llm.engine.score(ids))
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    p = perplexity(llm.engine, ids, context=20)
    assert p.windows == 3 and p.tokens_scored == 57  # [0:20], [20:40], [40:60]; the lone last token is dropped
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.kv_cache_manager.num_blocks  # all given back


def test_perplexity_of_smollm2_matches_transformers(smollm2, smollm2_hf):
    text = "The Moon is the only natural satellite of the Earth. It orbits at about 384,000 kilometres."
    ids = smollm2.tokenizer(text, add_special_tokens=False).input_ids
    ours = perplexity(smollm2.engine, ids, context=len(ids))
    with torch.no_grad():
        loss = smollm2_hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert ours.mean_nll == pytest.approx(loss, rel=1e-4)
    assert ours.perplexity == pytest.approx(math.exp(loss), rel=1e-3)


def test_greedy_agreement_counts():
    a = greedy_agreement([[1, 2, 3], [1, 9, 9], [5]], [[1, 2, 3], [1, 2, 3], [6]])
    assert a.identical == 1 and a.prompts == 3
    assert a.prefix_share == pytest.approx((1 + 1 / 3 + 0) / 3)


def test_the_eval_command(run_cli, tmp_path):
    p = run_cli("eval", "--dtype", "bfloat16", "--limit-tokens", 300, "--max-tokens", 8, "--json", check=0)
    r = json.loads(p.stdout)
    assert r["dtype"] == "bfloat16" and r["tokens_scored"] > 250 and 5 < r["perplexity"] < 100
    assert r["reference"]["dtype"] == "float32" and abs(r["perplexity_change"]) < 0.05
    assert r["agreement"]["prompts"] == 8 and 0 <= r["agreement"]["prefix_share"] <= 1
    text = tmp_path / "t.txt"
    text.write_text("Hello world. " * 50)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hi"}\nThe sky is\n')
    p = run_cli("eval", "--text", text, "--prompts", prompts, check=0)
    assert "perplexity:" in p.stdout and "agreement" not in p.stdout  # float32 is its own reference
    p = run_cli("eval", "--text", tmp_path / "missing.txt", check=2)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
