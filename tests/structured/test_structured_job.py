"""Structured outputs through `tokenmill run` (real subprocesses, SmolLM2, greedy): OpenAI response_format
(json_schema with strict, json_object), vLLM-style structured_outputs on plain and chat lines, a job default from
--json-schema that a line's own constraint (or {"type": "text"}) overrides, invalid constraints as error records
naming their lines, rows cut by max_tokens reported as "length", and a config-file default."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from helpers import read_jsonl, write_jsonl

REVIEW = {"type": "object", "additionalProperties": False, "required": ["sentiment", "score"],
          "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                         "score": {"type": "integer", "minimum": 0, "maximum": 10}}}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}}}


def test_a_schema_extraction_job(tmp_path, run_cli):
    rows = [
        {"custom_id": "o1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "A person as JSON with name and age."}], "max_tokens": 60,
                  "response_format": {"type": "json_schema",
                                      "json_schema": {"name": "person", "strict": True, "schema": PERSON}}}},
        {"custom_id": "o2", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "Describe a dog as a JSON object."}], "max_tokens": 60,
                  "response_format": {"type": "json_object"}}},
        {"id": "c1", "messages": [{"role": "user", "content": "Is the sky blue? yes or no"}],
         "structured_outputs": {"choice": ["yes", "no"]}},
        {"id": "r1", "prompt": "Order number: ", "structured_outputs": {"regex": "[A-Z]{2}-[0-9]{4}"}},
        {"id": "t1", "prompt": "Once upon a time", "response_format": {"type": "text"}, "max_tokens": 6},
        {"id": "bad-schema", "prompt": "x", "response_format": {"type": "json_schema",
                                                                 "json_schema": {"name": "b", "schema": {"type": 7}}}},
        {"id": "bad-regex", "prompt": "x", "structured_outputs": {"regex": "(("}},
        {"id": "both", "prompt": "x", "structured_outputs": {"regex": "a"}, "response_format": {"type": "text"}},
        {"id": "cut", "messages": [{"role": "user", "content": "Review: meh."}], "max_tokens": 3},
    ] + [{"id": f"rev{i}", "messages": [{"role": "user", "content": f"Review: {t}"}]}
         for i, t in enumerate(["Loved it!", "Terrible plot.", "It was fine.", "Best film this year."])]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    schema_file = tmp_path / "review.json"
    schema_file.write_text(json.dumps(REVIEW))
    out = tmp_path / "out.jsonl"
    p = run_cli("run", src, "-o", out, "--json-schema", schema_file, "--temperature", 0, "--max-tokens", 40, check=1)
    got = {r.get("custom_id", r.get("id")): r for r in read_jsonl(out)}
    cut = [k for k, r in got.items() if k != "t1" and (r.get("finish_reason") or r.get("response", {}).get(
        "body", {}).get("choices", [{}])[0].get("finish_reason")) == "length"]
    assert "cut" in cut and f"structured outputs: {len(cut)} rows reached max_tokens" in p.stderr, (cut, p.stderr)
    body = got["o1"]["response"]["body"]["choices"][0]
    jsonschema.validate(json.loads(body["message"]["content"]), PERSON)
    o2 = got["o2"]["response"]["body"]["choices"][0]
    assert o2["message"]["content"].startswith("{")
    if o2["finish_reason"] == "stop":
        assert isinstance(json.loads(o2["message"]["content"]), dict)
    assert got["c1"]["completion"] in ("yes", "no")
    assert len(got["r1"]["completion"]) == 7 and got["r1"]["completion"][2] == "-"
    assert not got["t1"]["completion"].lstrip().startswith("{")  # "text" lifts the job default
    assert got["cut"]["finish_reason"] == "length" and got["cut"]["completion"].startswith("{")
    for i in range(4):
        jsonschema.validate(json.loads(got[f"rev{i}"]["completion"]), REVIEW)
    errors = {e["id"]: e for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert {k: e["code"] for k, e in errors.items()} == {
        "bad-schema": "invalid_structured_output", "bad-regex": "invalid_structured_output",
        "both": "invalid_structured_output"}
    assert errors["bad-regex"]["message"].startswith("line 7: invalid regex")


def test_a_config_file_default_and_flag_errors(tmp_path, run_cli):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "messages": [{"role": "user", "content": q}]}
                                              for i, q in enumerate(["Is fire hot?", "Is ice hot?"])])
    cfg = tmp_path / "batch.yaml"
    cfg.write_text("sampling:\n  temperature: 0\n  max_tokens: 8\n  structured:\n    choice: [yes, no]\n")
    p = run_cli("run", src, "-o", tmp_path / "o1.jsonl", "--config", cfg, check=2)
    assert "quote them" in p.stderr  # YAML's booleans: one clear line
    cfg.write_text('sampling:\n  temperature: 0\n  max_tokens: 8\n  structured:\n    choice: ["yes", "no"]\n')
    out = tmp_path / "out.jsonl"
    run_cli("run", src, "-o", out, "--config", cfg, check=0)
    assert all(r["completion"] in ("yes", "no") for r in read_jsonl(out))
    p = run_cli("run", src, "-o", tmp_path / "o2.jsonl", "--choices", "a,b", "--regex", "x", check=2)
    assert "at most one of" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "nonsense"}')
    p = run_cli("run", src, "-o", tmp_path / "o3.jsonl", "--json-schema", bad, check=2)
    assert "invalid json" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_the_readme_extraction_example(tmp_path, run_cli):
    """README's schema-extraction command on the shipped example files: every row validates."""
    root = Path(__file__).resolve().parents[2] / "examples"
    schema = json.loads((root / "review.schema.json").read_text())
    out = tmp_path / "labels.jsonl"
    run_cli("run", root / "reviews.jsonl", "-o", out, "--json-schema", root / "review.schema.json", "--temperature", 0,
            check=0)
    rows = read_jsonl(out)
    assert len(rows) == 10
    for r in rows:
        jsonschema.validate(json.loads(r["completion"]), schema)
