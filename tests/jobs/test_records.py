"""Parsing, validation and output records without running a model (except the tokenizer)."""

import json

import pytest

from tokenmill.jobs.files import JobPaths, repair_torn_tail
from tokenmill.jobs.planner import plan_memory
from tokenmill.jobs.cost import cost_per_million_tokens
from tokenmill.jobs.records import JobError, parse_line


def template(messages):
    return "|".join(f"{m['role']}:{m['content']}" for m in messages)


def parse(obj):
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(raw, 7, template)


def code_of(obj):
    with pytest.raises(JobError) as e:
        parse(obj)
    assert "line 7" in e.value.message
    return e.value.code


def test_plain_and_chat_lines_with_overrides():
    r = parse({"id": "a", "prompt": "hi", "max_tokens": 5, "temperature": 0, "seed": 3, "stop": ["x"], "extra": 1})
    assert r.kind == "plain" and r.prompt == "hi" and r.sampling == {"max_tokens": 5, "temperature": 0, "seed": 3,
                                                                      "stop": ["x"]}
    r = parse({"id": 5, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}]})
    assert r.is_chat and r.prompt == "user:ab" and r.record_id == 5


def test_openai_lines():
    r = parse({"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 9, "top_p": 0.5}})
    assert r.kind == "openai_chat" and r.sampling == {"max_tokens": 9, "top_p": 0.5}
    r = parse({"custom_id": "c2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p", "max_tokens": 3}})
    assert r.kind == "openai_completion" and r.prompt == "p"


@pytest.mark.parametrize("obj,code", [
    (b"\xff\xfe{}", "invalid_utf8"),
    (b"{not json", "invalid_json"),
    ([1, 2], "not_an_object"),
    ({"prompt": "x"}, "invalid_id"),
    ({"id": 1.5, "prompt": "x"}, "invalid_id"),
    ({"id": True, "prompt": "x"}, "invalid_id"),
    ({"id": 1}, "missing_input"),
    ({"id": 1, "prompt": "x", "messages": []}, "missing_input"),
    ({"id": 1, "messages": "hi"}, "invalid_messages"),
    ({"id": 1, "messages": [{"content": "no role"}]}, "invalid_messages"),
    ({"id": 1, "messages": [{"role": "user", "content": 5}]}, "invalid_messages"),
    ({"id": 1, "prompt": ""}, "empty_prompt"),
    ({"id": 1, "prompt": 42}, "invalid_prompt"),
    ({"id": 1, "prompt": "x", "temperature": -1}, "invalid_sampling"),
    ({"id": 1, "prompt": "x", "top_p": 0}, "invalid_sampling"),
    ({"id": 1, "prompt": "x", "max_tokens": "ten"}, "invalid_sampling"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {}}, "unsupported_url"),
    ({"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}, "unsupported_method"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p", "n": 0}}, "invalid_sampling"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p", "n": 3, "best_of": 2}},
     "invalid_sampling"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
      "body": {"messages": [{"role": "user", "content": "x"}], "best_of": 2}}, "unsupported_field"),
    ({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": "x"}, "invalid_body"),
    ({"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}, "invalid_id"),
])
def test_each_bad_line_gets_its_stable_code(obj, code):
    assert code_of(obj) == code


def test_error_record_shapes():
    rec = JobError("unsupported_n", "m", "c", openai=True).to_record(3)
    assert rec["line"] == 3 and rec["custom_id"] == "c" and rec["error"] == {"code": "unsupported_n", "message": "m"}
    assert JobError("invalid_json", "m").to_record(1) == {"line": 1, "id": None, "code": "invalid_json", "message": "m"}


def test_job_paths_and_torn_tail(tmp_path):
    p = JobPaths(tmp_path / "results.jsonl")
    assert p.errors.name == "results.errors.jsonl" and p.state.name == "results.state.json"
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "comp')
    assert repair_torn_tail(out) == len(b'{"id": 3, "comp')
    assert out.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    assert repair_torn_tail(out) == 0
    out.write_bytes(b"partial only")
    repair_torn_tail(out)
    assert out.read_bytes() == b""


def test_planner_follows_the_seed_arithmetic():
    plan = plan_memory([100] * 10, [156] * 10, max_model_len=4096, block_size=16, kv_bytes_per_block=1000,
                       num_blocks=1600)
    assert plan.blocks_per_seq_avg == 16 and plan.max_concurrent == 100
    assert plan.safe_concurrent == int(1600 / (16 * 1.3)) == 76
    assert plan.recommended_max_num_seqs == 10  # never more than the requests
    assert plan.prompt_p95 == 100 and plan.total_max == 256


def test_cost_matches_seed_formula():
    # seeds: 4 GPUs at $3/h, 6,380 tok/s -> $0.52 per million
    assert round(cost_per_million_tokens(4, 3.0, 6380), 2) == 0.52


def test_id_index_across_merges_keeps_each_ids_line():
    from tokenmill.jobs.scan import IdIndex

    s = IdIndex(batch=8)
    values = [(i * 2654435761) % (2**64) for i in range(100)]
    for line, v in enumerate(values, 1):
        assert v not in s
        s.add(v, line)
    assert all(v in s for v in values) and 2**64 - 1 not in s and 3 not in s
    assert [s.line_of(v) for v in values] == list(range(1, 101))
