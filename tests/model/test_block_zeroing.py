"""The KV cache is allocated uninitialised and each block zeroed the first time a step uses it (attention reads whole
blocks; a masked slot must hold a finite value). Here the cache starts full of NaN, as uninitialised memory may:
outputs must equal an engine whose cache is clean, also after the pool has been cycled (when the runner stops
checking), and with blocks that come back from swap space."""

from __future__ import annotations

import random

import pytest

from helpers import save_tiny_model
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling_params import SamplingParams


def run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    outs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs[o.request_id] = o.token_ids
    return [outs[str(i)] for i in range(len(prompts))]


@pytest.mark.parametrize("swap", [False, True])
def test_a_cache_full_of_nan_gives_the_clean_caches_outputs(tmp_path, swap):
    save_tiny_model("llama", tmp_path / "m")
    options = {"model": str(tmp_path / "m"), "num_threads": 1, "block_size": 4, "num_kv_blocks": 24,
               "max_model_len": 64,
               "max_num_seqs": 6, "max_num_batched_tokens": 64}
    if swap:
        options.update(preemption_mode="swap", swap_space=0.001)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randint(3, 17))] for _ in range(14)]
    params = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    clean = LLMEngine(EngineConfig.from_dict(options))
    for k, v in clean.runner.kv_caches:
        k.zero_()
        v.zero_()
    expected = run(clean, prompts, params)
    dirty = LLMEngine(EngineConfig.from_dict(options))
    for k, v in dirty.runner.kv_caches:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    assert run(dirty, prompts, params) == expected
    assert dirty.runner._num_unzeroed == 0  # 14 requests cycled the 24 blocks: every block zeroed once
    assert run(dirty, prompts[::-1], params) == expected[::-1]  # and nothing checked or zeroed since
    if swap:
        assert dirty.stats.num_swap_outs > 0
