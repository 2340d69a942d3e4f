"""EleutherAI's lm-evaluation-harness (the real `lm_eval` package) against `tokenmill serve` on SmolLM2:
`--model local-completions` (log-likelihoods through echo + logprobs, prompts as token-id lists, batched four to
a request; generations through plain completions) gives the same accuracy and the same per-request
log-likelihoods (within 1e-3) and generations as lm-eval's own `--model hf` backend on the same GGUF in float32.
The two tasks (multiple choice, generate-until) are built from data files the test writes: no hub."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from test_server import Server

MC = [("The capital of France is", [" Paris", " London", " Rome"], 0),
      ("The opposite of hot is", [" cold", " warm", " blue"], 0),
      ("Two plus two equals", [" five", " four", " three"], 1),
      ("The sky on a clear day is", [" green", " red", " blue"], 2),
      ("A baby cat is called a", [" puppy", " kitten", " calf"], 1),
      ("Water freezes at zero degrees", [" Celsius", " Fahrenheit", " Kelvin"], 0)]
GEN = ["Q: What color is grass?\nA:", "Q: How many legs does a dog have?\nA:", "Q: What is the capital of Italy?\nA:"]


def write_tasks(root) -> None:
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                           for q, c, a in MC))
    (root / "gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": "green"}) + "\n" for q in GEN))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "tm_mc.yaml").write_text(
        f"task: tm_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (tasks / "tm_gen.yaml").write_text(
        f"task: tm_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


@pytest.fixture(scope="module")
def server(cli_env, smollm2):
    s = Server(cli_env, "--max-num-seqs", 8, "--max-model-len", 512)
    yield s
    s.stop()


def test_lm_eval_local_completions_equals_its_hf_backend(tmp_path, monkeypatch, server, smollm2, cache_dir):
    import lm_eval  # the test extra's lm_eval[api]
    from lm_eval.tasks import TaskManager

    from tokenmill.model.loader import default_model_path, read_model_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    write_tasks(tmp_path)
    tm = TaskManager(include_path=str(tmp_path / "tasks"))
    gguf = default_model_path()
    hf_dir, _ = read_model_config(gguf, Path(cache_dir), with_weights=False)  # the converted tokenizer
    name = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.port}/v1/models").read())["data"][0]["id"]

    def evaluate(model: str, args: str, **kw) -> dict:
        return lm_eval.simple_evaluate(model=model, model_args=args, tasks=["tm_mc", "tm_gen"], task_manager=tm,
                                       log_samples=True, **kw)

    ref = evaluate("hf", f"pretrained={gguf.parent},gguf_file={gguf.name},tokenizer={hf_dir},dtype=float32",
                   batch_size=1, device="cpu")
    ours = evaluate("local-completions", f"base_url=http://127.0.0.1:{server.port}/v1/completions,model={name},"
                    f"tokenizer={hf_dir},tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,"
                    f"max_retries=1", batch_size=4)
    assert ours["results"]["tm_mc"]["acc,none"] == ref["results"]["tm_mc"]["acc,none"] > 0.5
    assert ours["results"]["tm_gen"]["exact_match,none"] == ref["results"]["tm_gen"]["exact_match,none"]
    for a, b in zip(ours["samples"]["tm_mc"], ref["samples"]["tm_mc"]):
        for (lp_a, greedy_a), (lp_b, greedy_b) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert abs(lp_a - lp_b) < 1e-3 and greedy_a == greedy_b
    assert [s["filtered_resps"] for s in ours["samples"]["tm_gen"]] == \
        [s["filtered_resps"] for s in ref["samples"]["tm_gen"]]
