"""Tensor parallelism over gloo on CPU: two ranks (two processes) give the same greedy tokens as one.

Each case builds ``LLM(..., tensor_parallel_size=2)`` (rank 0 here, rank 1 spawned) on a tiny random-weight model
and compares with the single-rank engine and transformers on a busy, chunked batch. The cases cover what the split
touches: GQA heads split across ranks, qkv bias (Qwen2), q/k norms (Qwen3), a tied head, and a vocabulary that does
not divide by the ranks (the last slice padded)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest

from helpers import assert_greedy_equal, hf_greedy, save_tiny_model
from tokenmill import LLM, SamplingParams

CASES = {
    "llama": {},
    "qwen2": {},  # qkv bias
    "qwen3": {},  # q/k norms
    "llama3_tied": {"vocab_size": 251},  # tied head, vocabulary not a multiple of 2
    "phi3": {},  # q|k|v and gate|up fused in the checkpoint: each part sliced; RoPE on half of each head
    "gemma2": {},  # sandwich norms (o_proj / down_proj without the residual), softcaps, sliding layers
    "mixtral": {},  # every expert's intermediate channels split, the router replicated
    "qwen2_moe": {},  # a dense layer, a sparse one with a gated shared expert
}


def _prompts(vocab: int, n: int = 10) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


@pytest.mark.parametrize("arch", list(CASES))
def test_two_ranks_equal_one_and_transformers(tmp_path, arch):
    overrides = CASES[arch]
    hf = save_tiny_model(arch, tmp_path / "m", **overrides)
    vocab = hf.config.vocab_size
    prompts = _prompts(vocab)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    options = dict(max_num_batched_tokens=48, max_num_seqs=6, num_kv_blocks=64, block_size=4)  # chunked, busy
    one = [o.token_ids for o in LLM(str(tmp_path / "m"), **options).generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(tmp_path / "m"), tensor_parallel_size=2, **options)
    try:
        assert llm.engine.runner.kv_caches[0][0].shape[2] == hf.config.num_key_value_heads // 2  # this rank's heads
        two = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        again = [o.token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]  # the group keeps serving
    finally:
        llm.close()
    assert two == one
    assert again == one[:3]
    for p, ours in zip(prompts[:4], two):
        ref, ref_logits = hf_greedy(hf, p, 12)
        assert_greedy_equal(ours, ref, ref_logits, f"{arch} tp=2")


def test_prompt_logprobs_with_two_ranks_equal_one(tmp_path):
    """Rank 0 sends the prompt-logprob rows with the step; rank 1 runs the same LM-head passes over them."""
    save_tiny_model("llama", tmp_path / "m")
    prompts = _prompts(256, n=6)
    params = [SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=[0, 3, None][i % 3]) for i in range(6)]
    options = dict(max_num_batched_tokens=32, max_num_seqs=4, num_kv_blocks=64, block_size=4)  # chunked prefill
    one = LLM(str(tmp_path / "m"), **options).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(tmp_path / "m"), tensor_parallel_size=2, **options)
    try:
        two = llm.generate(prompts, params, use_tqdm=False)
        scores = llm.engine.score_batch(prompts[:2])
    finally:
        llm.close()
    for a, b, p in zip(one, two, params):
        assert a.token_ids == b.token_ids and a.prompt_token_ranks == b.prompt_token_ranks
        if p.prompt_logprobs is None:
            assert b.prompt_logprobs is None
            continue
        for ea, eb in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert ea.keys() == eb.keys() and all(abs(ea[t] - eb[t]) < 1e-5 for t in ea)
    for got, out in zip(scores, one[:2]):
        want = [e[t] for e, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        assert max(abs(x - y) for x, y in zip(got, want)) < 1e-5


def test_a_split_that_does_not_divide_is_one_clear_error(tmp_path):
    rendezvous = set(Path(tempfile.gettempdir()).glob("tokenmill-tp-*"))
    save_tiny_model("llama", tmp_path / "m", num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 must divide num_key_value_heads \(3\)"):
        LLM(str(tmp_path / "m"), tensor_parallel_size=2, num_kv_blocks=16)
    save_tiny_model("olmoe", tmp_path / "olmoe")  # q/k norms over all heads at once: no split of the heads
    with pytest.raises(ValueError, match="normalises q and k over all heads"):
        LLM(str(tmp_path / "olmoe"), tensor_parallel_size=2, num_kv_blocks=16)
    # the failed engines left no group behind: a good one starts in the same process
    save_tiny_model("llama", tmp_path / "ok")
    llm = LLM(str(tmp_path / "ok"), tensor_parallel_size=2, num_kv_blocks=16)
    llm.close()
    # and every group's rendezvous directory is gone with it, the failed ones' too
    assert set(Path(tempfile.gettempdir()).glob("tokenmill-tp-*")) <= rendezvous


def test_quantization_with_tensor_parallel_is_refused_before_any_process_starts():
    from tokenmill.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="float weights only"):
        EngineConfig.from_dict({"tensor_parallel_size": 2, "quantization": "int8"})


def test_a_job_runs_with_two_ranks_from_the_command_line(tmp_path):
    """``tokenmill run --tensor-parallel-size 2``: the same results as one rank, and the worker process ends with
    the job."""
    import json
    import subprocess
    import sys

    save_tiny_model("qwen2", tmp_path / "m")
    rows = [{"id": f"r{i}", "prompt": " ".join(f"w{(7 * i + j) % 200 + 3}" for j in range(5 + i))} for i in range(8)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(out: str, *flags: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "tokenmill.cli", "run", str(tmp_path / "in.jsonl"), "-o",
                               str(tmp_path / out), "-m", str(tmp_path / "m"), "--temperature", "0", "--max-tokens",
                               "6", "--kv-cache-memory", "0.01", "-q", *flags], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr
        return {r["id"]: r["completion"] for r in map(json.loads, (tmp_path / out).read_text().splitlines())}

    two = run("tp2.jsonl", "--tensor-parallel-size", "2")
    assert len(two) == 8 and all(two.values()) and two == run("tp1.jsonl")


def test_swap_preemption_with_two_ranks_equals_one(tmp_path):
    """Rank 0 sends the step's swap pairs; every rank copies its own heads' blocks out and back in."""
    save_tiny_model("llama", tmp_path / "m")
    prompts = _prompts(256, n=16)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    options = dict(max_num_batched_tokens=48, max_num_seqs=12, num_kv_blocks=24, block_size=4, max_model_len=64,
                   preemption_mode="swap", swap_space=1e-3)
    one = [o.token_ids for o in LLM(str(tmp_path / "m"), **options).generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(tmp_path / "m"), tensor_parallel_size=2, **options)
    try:
        two = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        swaps = llm.engine.stats.num_swap_outs
    finally:
        llm.close()
    assert swaps > 0, "the pool was meant to be small enough to swap"
    assert two == one
