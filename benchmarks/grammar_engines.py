"""xgrammar against llguidance on SmolLM2's tokenizer (49,152 tokens): what picked the grammar engine.

For each engine: building its tokenizer data, compiling the extraction schema of ``structured_bench``, and per step
of a batch of ``--batch`` constrained requests walking one valid JSON instance token by token: filling every mask
and applying them to random logits with the engine's own CPU helper. Neither engine is timed inside a model step
here; ``structured_bench`` measures the mask's cost in real jobs.

xgrammar is not a tokenmill dependency (it pulls triton into every Linux install); to rerun this:
``pip install --no-deps xgrammar apache-tvm-ffi`` then ``python -m benchmarks.grammar_engines``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from benchmarks.structured_bench import SCHEMA
from tokenmill import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    llm = LLM(kv_cache_memory=0.5)
    tok, vocab, eos = llm.tokenizer, llm.engine.model_config.vocab_size, sorted(llm.engine.eos_token_ids)
    instance = json.dumps({"name": "Ada Lovelace", "age": 36, "occupation": "engineer", "city": "London",
                           "is_student": False})
    ids = tok(instance, add_special_tokens=False).input_ids
    logits = torch.randn(a.batch, vocab)
    res = {}

    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
    t1 = time.perf_counter()
    compiled = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA))
    t2 = time.perf_counter()
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(a.batch)]
    bitmask = xgr.allocate_token_bitmask(a.batch, vocab)
    fill = apply = 0.0
    for t in ids:
        s0 = time.perf_counter()
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
        s1 = time.perf_counter()
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        s2 = time.perf_counter()
        for m in matchers:
            assert m.accept_token(t)
        fill, apply = fill + s1 - s0, apply + s2 - s1
    res["xgrammar"] = (t1 - t0, t2 - t1, fill / len(ids), apply / len(ids))

    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    t1 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    llguidance.LLMatcher.validate_grammar(grammar, lt)
    t2 = time.perf_counter()
    matchers = [llguidance.LLMatcher(lt, grammar) for _ in range(a.batch)]
    bitmask = llguidance.torch.allocate_token_bitmask(a.batch, vocab)
    fill = apply = 0.0
    for t in ids:
        s0 = time.perf_counter()
        for i, m in enumerate(matchers):
            llguidance.torch.fill_next_token_bitmask(m, bitmask, i)
        s1 = time.perf_counter()
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        s2 = time.perf_counter()
        for m in matchers:
            assert m.consume_token(t), m.get_error()
        fill, apply = fill + s1 - s0, apply + s2 - s1
    res["llguidance"] = (t1 - t0, t2 - t1, fill / len(ids), apply / len(ids))

    print(f"| engine | tokenizer data (s) | compile the schema (ms) | fill {a.batch} masks per step (ms) | "
          f"its CPU apply per step (ms) |\n|---|---|---|---|---|")
    for k, (setup, comp, f, ap_) in res.items():
        print(f"| {k} | {setup:.2f} | {1000 * comp:.1f} | {1000 * f:.2f} | {1000 * ap_:.1f} |")


if __name__ == "__main__":
    main()
