"""Fuzzing the whole input surface (hypothesis, derandomized: the same examples every run).

Property: whatever the bytes, nothing raises; every non-blank line ends as exactly one valid request or exactly one
error record naming its line (with a known code and a message of ours, starting "line N"), and every record can be
written. In process against the validation pass with the real SmolLM2 tokenizer and chat template (hundreds of
examples), then end to end through real `tokenmill run`, `validate` and `embed` processes (a few examples each):
exit codes as documented and exactly one result or error record per line.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import read_jsonl, tokenmill_cmd
from tokenmill.jobs.files import JsonlAppender
from tokenmill.jobs.inputs import InputSource, InputSpec
from tokenmill.jobs.records import ERROR_CODES, JobError
from tokenmill.jobs.scan import scan

VALID = [
    {"id": "v-plain", "prompt": "Hello there", "max_tokens": 2},
    {"id": "v-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    {"custom_id": "v-openai", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "x", "messages": [{"role": "user", "content": "Yo"}], "max_tokens": 1}},
    {"custom_id": "v-cmpl", "method": "POST", "url": "/v1/completions", "body": {"prompt": "The", "max_tokens": 1}},
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["id", "custom_id", "prompt", "messages", "text", "max_tokens", "temperature", "top_p",
                               "seed", "stop", "method", "url", "body", "n", "logprobs", "response_format"])
near_valid = st.builds(  # objects shaped like real rows, with arbitrary values in the known fields
    lambda base, extra: json.dumps({**base, **extra}),
    st.sampled_from(VALID), st.dictionaries(field_names, json_values, max_size=3))
openai_bodies = st.builds(
    lambda url, body: json.dumps({"custom_id": "o", "method": "POST", "url": url, "body": body}),
    st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v2/x"]),
    st.dictionaries(st.sampled_from(["messages", "prompt", "max_tokens", "logprobs", "top_logprobs", "tools", "n",
                                     "temperature", "stream", "input", "presence_penalty"]), json_values, max_size=4))
special = st.sampled_from([
    "[" * 5000 + "]" * 5000,  # deep nesting
    '{"id": "big", "prompt": "x", "seed": ' + "9" * 5000 + "}",  # an integer past Python's digit limit
    '{"id": "nan", "prompt": "x", "temperature": NaN}', '{"id": "inf", "prompt": "x", "top_p": Infinity}',
    '{"id": "sur\\ud800", "prompt": "x"}', '{"id": "s2", "prompt": "lone \\udfff"}',
    '{"id": "nul", "prompt": "a\\u0000b"}', '{"id": "big-mt", "prompt": "x", "max_tokens": 100000000000000000000}',
    '{"id": "stop", "prompt": "x", "stop": 5}', '{"id": "tok", "prompt": [1, 2, -3]}',
    '{"id": "long", "prompt": "' + "word " * 3000 + '"}',
])
lines = st.one_of(
    st.binary(max_size=60),  # arbitrary bytes (may hold \n / \r: then they are several lines)
    json_values.map(json.dumps),
    near_valid, openai_bodies, special,
    st.text(max_size=40),
)
files = st.lists(lines, min_size=1, max_size=12).map(
    lambda ls: b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in ls))
endings = st.sampled_from([b"\n", b"\r\n", b"\r"])


def build_file(body: bytes, ending: bytes, bom: bool) -> bytes:
    """A valid first line (so the file is recognisably JSON Lines), then the fuzzed lines, in one line ending."""
    data = json.dumps(VALID[0]).encode() + b"\n" + body
    data = data.replace(b"\r\n", b"\n").replace(b"\n", ending) if ending != b"\n" else data
    return (b"\xef\xbb\xbf" if bom else b"") + data


def expected_lines(data: bytes) -> dict[int, bytes]:
    """Line number -> content for every non-blank line, as the job must number them (universal newlines)."""
    body = data.removeprefix(b"\xef\xbb\xbf")
    return {i: line for i, line in enumerate(body.splitlines(), 1) if line.strip()}


@pytest.fixture(scope="module")
def pre(cache_dir):
    from tokenmill.jobs.runner import JobContext

    return JobContext(None, {"cache_dir": cache_dir, "max_model_len": 512}, {"max_tokens": 4}).pre


@settings(derandomize=True, max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=files, ending=endings, bom=st.booleans())
def test_validation_pass_accounts_for_every_line_and_never_raises(pre, body, ending, bom):
    data = build_file(body, ending, bom)
    want = expected_lines(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        errors: dict[int, JobError] = {}

        def on_error(line_no: int, err: JobError) -> None:
            assert line_no not in errors, f"line {line_no} got two error records"
            errors[line_no] = err

        with InputSource(InputSpec(str(path))) as src:
            result = scan(src, pre, on_error)
        valid = {n for n in range(len(result.valid)) if result.valid[n]}
        assert valid.isdisjoint(errors), "a line is both valid and an error"
        assert valid | set(errors) == set(want), "every non-blank line is valid or an error, nothing else"
        assert 1 in valid
        sink = JsonlAppender(Path(tmp) / "errors.jsonl")
        for n, err in errors.items():
            assert err.code in ERROR_CODES
            assert err.message.startswith(f"line {n}"), err.message
            sink.write(err.to_record(n))  # every record can be written
        sink.close()
        if errors:
            assert len(read_jsonl(Path(tmp) / "errors.jsonl")) == len(errors)


# ------------------------------------------------------------------ end to end, real processes
def check_job_output(data: bytes, results: list[dict], errors: list[dict], id_field: str = "id") -> None:
    want = expected_lines(data)
    err_lines = [e["line"] for e in errors]
    assert len(err_lines) == len(set(err_lines)) and set(err_lines) <= set(want)
    assert len(results) + len(errors) == len(want), "exactly one result or error record per non-blank line"
    ids = [json.dumps(r.get("custom_id", r.get(id_field))) for r in results]
    assert len(ids) == len(set(ids))


e2e = settings(derandomize=True, max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))


@e2e
@given(body=files, ending=endings, bom=st.booleans())
def test_run_and_validate_processes_on_fuzzed_files(cli_env, body, ending, bom):
    data = build_file(body, ending, bom)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "out.jsonl"
        inp.write_bytes(data)
        run = subprocess.run(tokenmill_cmd("run", inp, "-o", out, "--max-tokens", 1, "--temperature", 0,
                                           "--max-model-len", 512, "--quiet"),
                             env=cli_env, capture_output=True, text=True, timeout=300)
        errors_path = Path(tmp) / "out.errors.jsonl"
        errors = read_jsonl(errors_path) if errors_path.exists() else []
        assert run.returncode == (1 if errors else 0), run.stderr
        assert "Traceback" not in run.stderr
        check_job_output(data, read_jsonl(out), errors)
        assert not (Path(tmp) / "out.lock").exists()
        val = subprocess.run(tokenmill_cmd("validate", inp, "--max-model-len", 512), env=cli_env,
                             capture_output=True, text=True, timeout=300)
        assert val.returncode == (1 if errors else 0) and "Traceback" not in val.stderr
        assert sorted(json.loads(x)["line"] for x in val.stdout.splitlines()) == sorted(e["line"] for e in errors)


@e2e
@given(body=files, ending=endings, bom=st.booleans())
def test_embed_process_on_fuzzed_files(embed_env, body, ending, bom):
    data = build_file(body, ending, bom).replace(b'"prompt"', b'"text"', 1)  # the first line is an embed row
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.jsonl", Path(tmp) / "v.jsonl"
        inp.write_bytes(data)
        proc = subprocess.run(tokenmill_cmd("embed", inp, "-o", out, "--format", "openai", "--quiet"),
                              env=embed_env, capture_output=True, text=True, timeout=300)
        errors_path = Path(tmp) / "v.errors.jsonl"
        errors = read_jsonl(errors_path) if errors_path.exists() else []
        assert proc.returncode == (1 if errors else 0), proc.stderr
        assert "Traceback" not in proc.stderr
        check_job_output(data, read_jsonl(out), errors)
