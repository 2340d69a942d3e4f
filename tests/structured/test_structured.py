"""Structured outputs on the real SmolLM2 model, greedy: every constrained output parses and validates against its
JSON schema (jsonschema), matches its regex, is one of its choices or is derived by its grammar; alone and inside a
busy batch of free requests, under chunked prefill, recompute preemption, prefix caching and seeds; max_tokens
before the grammar completes is finish_reason "length"; invalid constraints are clear errors at add time."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.structured import StructuredOutputs
from tokenmill.structured.params import from_response_format

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                         "kind": {"enum": ["person", "company", "place"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}}}
TEXTS = ["Ada Lovelace, a mathematician, died at 36.", "Acme Corp has been trading for 75 years.",
         "Paris, the capital of France, is about 2000 years old.", "Bob is a 12 year old boy who likes trains."]
GRAMMAR = 'root ::= "The answer is " answer "."\nanswer ::= "yes" | "no" | "maybe"'


def chats(texts):
    return [[{"role": "user", "content": f"Extract the entity as JSON (name, age, kind): {t}"}] for t in texts]


def test_json_schema_outputs_validate_alone_and_in_a_busy_batch(smollm2):
    sp = SamplingParams(max_tokens=80, temperature=0, structured={"json": PERSON})
    alone = [o.text for o in smollm2.chat(chats(TEXTS), sp, use_tqdm=False)]
    for text in alone:
        jsonschema.validate(json.loads(text), PERSON)
    # the same requests among unconstrained ones (chunked prefill: long free prompts share the steps)
    free = SamplingParams(max_tokens=24, temperature=0)
    mixed = chats(TEXTS) + [[{"role": "user", "content": "Tell me a story. " * 40}]] * 3
    outs = smollm2.chat(mixed, [sp] * len(TEXTS) + [free] * 3, use_tqdm=False)
    assert [o.text for o in outs[:len(TEXTS)]] == alone
    assert all(not o.text.startswith("{") for o in outs[len(TEXTS):])  # free rows are not constrained


def test_choice_regex_grammar_and_json_object(smollm2):
    labels = ["positive", "negative", "neutral"]
    outs = smollm2.chat([[{"role": "user", "content": f"Sentiment of: {t}"}] for t in ("I love it", "Awful.", "Ok")],
                        SamplingParams(max_tokens=8, temperature=0, structured={"choice": labels}), use_tqdm=False)
    assert all(o.text in labels and o.finish_reason == "stop" for o in outs)
    out = smollm2.generate(["Call me at "], SamplingParams(max_tokens=20, temperature=0,
                                                            structured={"regex": r"\(\d{3}\) \d{3}-\d{4}"}),
                           use_tqdm=False)[0]
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out.text), out.text
    out = smollm2.generate(["Is water wet? "], SamplingParams(max_tokens=20, temperature=0,
                                                               structured={"grammar": GRAMMAR}), use_tqdm=False)[0]
    assert re.fullmatch(r"The answer is (yes|no|maybe)\.", out.text), out.text
    out = smollm2.chat([[{"role": "user", "content": "Describe a cat as a JSON object."}]],
                       SamplingParams(max_tokens=60, temperature=0, structured={"json_object": True}),
                       use_tqdm=False)[0]
    assert isinstance(json.loads(out.text), dict), out.text


def test_seeded_sampling_is_constrained_and_reproducible(smollm2):
    sp = SamplingParams(max_tokens=80, temperature=1.0, seed=7, structured={"json": PERSON})
    a = smollm2.chat(chats(TEXTS[:2]), sp, use_tqdm=False)
    b = smollm2.chat(chats(TEXTS[:2])[::-1], sp, use_tqdm=False)[::-1]
    assert [o.text for o in a] == [o.text for o in b]
    for o in a:
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), PERSON)


def test_max_tokens_before_the_grammar_completes_is_length(smollm2):
    out = smollm2.chat(chats(TEXTS[:1]), SamplingParams(max_tokens=4, temperature=0, structured={"json": PERSON}),
                       use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    assert out.text.startswith("{")


def test_recompute_preemption_and_prefix_caching_give_the_same_outputs(cache_dir, smollm2):
    """A tiny KV cache forces recompute preemptions mid-generation; matchers survive them (outputs are kept)."""
    sp = SamplingParams(max_tokens=60, temperature=0, structured={"json": PERSON})
    texts = TEXTS * 2
    want = [o.text for o in smollm2.chat(chats(texts), sp, use_tqdm=False)]
    llm = LLM(cache_dir=cache_dir, num_kv_blocks=18, max_model_len=256, preemption_mode="recompute",
              max_num_batched_tokens=64, enable_prefix_caching=True)
    outs = llm.chat(chats(texts), sp, use_tqdm=False)
    assert llm.engine.stats.num_preemptions > 0
    assert llm.engine.stats.prefix_cache_hits > 0
    assert [o.text for o in outs] == want
    llm.engine.step()  # an empty step hands the runner the last finished requests
    # every finished request's runner record (its matcher, its block-table row) was released
    assert llm.engine.runner.buffers.block_table.num_live == 0


def test_invalid_constraints_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputs(choice=[])
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputs(json="{bad")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured={"regex": "a+"})
    with pytest.raises(ValueError, match="unknown structured output field"):
        SamplingParams(structured={"jsn": {}})
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == StructuredOutputs(json_object=True)
    rf = {"type": "json_schema", "json_schema": {"name": "p", "strict": True, "schema": PERSON}}
    assert from_response_format(rf) == StructuredOutputs(json=PERSON)
    with pytest.raises(ValueError, match="not supported"):
        from_response_format({"type": "xml"})


@pytest.mark.parametrize("spec,match", [({"json": {"type": "nonsense"}}, "invalid json"),
                                        ({"regex": "(("}, "invalid regex"),
                                        ({"grammar": "root ::= undefined_rule"}, "invalid grammar")])
def test_a_constraint_that_does_not_compile_is_refused_when_added(smollm2, spec, match):
    with pytest.raises(ValueError, match=match):
        smollm2.generate(["x"], SamplingParams(max_tokens=4, structured=spec), use_tqdm=False)
    assert not smollm2.engine.has_unfinished_requests()
