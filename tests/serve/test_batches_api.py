"""The Batch API of `tokenmill serve` with the real `openai` client, on SmolLM2: a batch's output equals `tokenmill run`
on the same file, bad lines are error-file lines in OpenAI's shape, online requests are served while a batch runs
(and equal the same request alone); a SIGKILLed server resumes its batch with every request exactly once, a batch
whose window passed while the server was down ends expired with its requests listed, and a cancel keeps what
finished. Every wait is bounded and follows the batch's own progress (its status, or its output file's lines)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time

import openai
import pytest

from helpers import tokenmill_cmd, write_jsonl
from test_server import KEY, Server

FINAL = ("completed", "failed", "expired", "cancelled")


MODEL = "SmolLM2-135M-Instruct.Q4_1"  # the served name of the default model


def chat_line(cid: str, text: str, max_tokens: int = 12, model: str = MODEL) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                     "temperature": 0}}


def wait_final(client, batch_id: str, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in FINAL:
            return b
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not finish: {b}")


def wait_lines(path, n: int, timeout: float = 600) -> None:
    """Until the batch's job has written ``n`` results (its output file, in the state dir)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {n} lines")


def jsonl(text: str) -> list[dict]:
    return [json.loads(x) for x in text.splitlines() if x.strip()]


def contents(records: list[dict]) -> dict:
    return {r["custom_id"]: (r["response"]["body"]["choices"][0]["message"]["content"],
                             r["response"]["body"]["usage"]) for r in records}


def run_reference(cli_env, tmp_path, src) -> dict:
    out = tmp_path / f"{src.stem}.ref.jsonl"
    subprocess.run(tokenmill_cmd("run", src, "-o", out, "--max-model-len", 256, "--quiet"), env=cli_env, check=True,
                   timeout=900)
    return contents(jsonl(out.read_text()))


def test_a_batch_equals_a_run_job_with_error_lines_and_online_requests_served_meanwhile(cli_env, smollm2, tmp_path):
    rows = [chat_line(f"c{i}", f"Name {i + 1} colours of the rainbow.") for i in range(10)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    lines.insert(6, json.dumps({"custom_id": "w", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": "hi", "max_tokens": 4}}))
    lines.append(json.dumps(chat_line("c0", "a second line with the same custom_id")))
    lines.append(json.dumps(chat_line("c99", "a model this server does not serve", model="gpt-4o")))
    src = write_jsonl(tmp_path / "batch.jsonl", lines)
    ref = run_reference(cli_env, tmp_path, write_jsonl(tmp_path / "valid.jsonl", rows))
    s = Server(cli_env, "--api-key", KEY, "--state-dir", tmp_path / "state", "--max-model-len", 256,
               "--max-num-seqs", 4)
    try:
        c = s.client()
        f = c.files.create(file=("batch.jsonl", src.read_bytes()), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                             metadata={"project": "tests"})
        assert b.status == "validating" and b.metadata == {"project": "tests"} and b.expires_at == b.created_at + 86400
        # an online request while the batch runs: served first, and equal to the same request alone afterwards
        msgs = [{"role": "user", "content": "Say hello in French."}]
        during = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
        b = wait_final(c, b.id)
        alone = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
        assert during.choices[0].message.content == alone.choices[0].message.content
        assert b.status == "completed", b.errors
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (14, 10, 4)
        assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
        out = jsonl(c.files.content(b.output_file_id).text)
        assert len(out) == 10 and contents(out) == ref  # token for token what `tokenmill run` writes
        assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
        errors = jsonl(c.files.content(b.error_file_id).text)
        assert [(e["line"], e["error"]["code"]) for e in errors] == [
            (4, "invalid_json"), (7, "mismatched_endpoint"), (13, "duplicate_id"), (14, "model_not_found")]
        assert all(set(e) >= {"custom_id", "response", "error"} for e in errors)
        assert c.files.retrieve(b.output_file_id).purpose == "batch_output"

        b2 = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        b2 = wait_final(c, b2.id)
        assert contents(jsonl(c.files.content(b2.output_file_id).text)) == ref
        page = c.batches.list(limit=1)
        assert [x.id for x in page.data] == [b2.id] and page.has_more
        assert [x.id for x in c.batches.list(limit=1, after=b2.id).data] == [b.id]
        assert [x.id for x in c.batches.list()] == [b2.id, b.id]
        with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status 'completed'"):
            c.batches.cancel(b.id)
        with pytest.raises(openai.NotFoundError):
            c.batches.retrieve("batch_nope")
        for kw, match in [(dict(endpoint="/v1/responses"), "endpoint must be one of"),
                          (dict(endpoint="/v1/embeddings"), "no embedding model"),
                          (dict(completion_window="1h"), "completion_window must be"),
                          (dict(input_file_id="file-nope"), "no such file"),
                          (dict(input_file_id=b.output_file_id), "has purpose 'batch_output'")]:
            args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kw}
            with pytest.raises(openai.BadRequestError, match=match):
                c.batches.create(**args)
    finally:
        s.stop()


def test_a_killed_server_resumes_exactly_once_expires_the_overdue_and_cancels_keep_what_finished(cli_env, smollm2,
                                                                                               tmp_path):
    state = tmp_path / "state"
    rows = [chat_line(f"k{i}", f"Write a short poem about the number {i}.", max_tokens=20) for i in range(12)]
    src = write_jsonl(tmp_path / "big.jsonl", rows)
    small = write_jsonl(tmp_path / "small.jsonl", rows[:3])
    ref = run_reference(cli_env, tmp_path, src)
    args = ("--api-key", KEY, "--state-dir", state, "--max-model-len", 256, "--max-num-seqs", 2)
    s = Server(cli_env, *args)
    try:
        c = s.client()
        big = c.batches.create(input_file_id=c.files.create(file=src.open("rb"), purpose="batch").id,
                               endpoint="/v1/chat/completions", completion_window="24h")
        later = c.batches.create(input_file_id=c.files.create(file=small.open("rb"), purpose="batch").id,
                                 endpoint="/v1/chat/completions", completion_window="24h")
        with pytest.raises(openai.ConflictError, match="has not finished"):
            c.files.delete(big.input_file_id)
        wait_lines(state / "batches" / big.id / "output.jsonl", 2)
        s.proc.kill()  # SIGKILL mid-batch
        s.proc.wait(timeout=60)
    finally:
        s.stop()
    with sqlite3.connect(state / "state.db") as db:  # the second batch's 24 h pass while the server is down
        db.execute("UPDATE batches SET expires_at = created_at - 1 WHERE id = ?", (later.id,))
    s = Server(cli_env, *args)
    try:
        c = s.client()
        b = wait_final(c, big.id)
        assert b.status == "completed" and b.request_counts.completed == 12
        out = jsonl(c.files.content(b.output_file_id).text)
        assert [r["custom_id"] for r in out] == [r["custom_id"] for r in rows]  # each exactly once, in input order
        assert contents(out) == ref
        e = wait_final(c, later.id)
        assert e.status == "expired" and e.expired_at is not None and e.output_file_id is None
        assert (e.request_counts.total, e.request_counts.completed, e.request_counts.failed) == (3, 0, 3)
        expired = jsonl(c.files.content(e.error_file_id).text)
        assert [(x["custom_id"], x["error"]["code"]) for x in expired] == [(f"k{i}", "batch_expired") for i in range(3)]

        cancel = c.batches.create(input_file_id=big.input_file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        wait_lines(state / "batches" / cancel.id / "output.jsonl", 1)
        assert c.batches.cancel(cancel.id).status in ("cancelling", "cancelled")
        cancel = wait_final(c, cancel.id)
        assert cancel.status == "cancelled" and cancel.cancelling_at <= cancel.cancelled_at
        kept = jsonl(c.files.content(cancel.output_file_id).text)
        assert 1 <= len(kept) == cancel.request_counts.completed < 12
        assert len({r["custom_id"] for r in kept}) == len(kept)
        assert {k: v for k, v in contents(kept).items()} == {k: ref[k] for k in contents(kept)}
        c.files.delete(big.input_file_id)  # no unfinished batch reads it any more
    finally:
        s.stop()


def embed_line(cid: str, text, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/embeddings", "body": {"input": text, **body}}


def test_an_embeddings_batch_equals_online_embeddings_and_limits_are_clear_400s(cli_env, smollm2, tmp_path):
    texts = [f"Passage {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(5)]
    lines = [json.dumps(embed_line(f"e{i}", t, model="all-MiniLM-L6-v2")) for i, t in enumerate(texts)]
    lines.insert(2, json.dumps(chat_line("c0", "not an embedding")))
    lines.append(json.dumps(embed_line("e-other", "hi", model="text-embedding-3-small")))
    lines.append(json.dumps(embed_line("e-b64", texts[0], encoding_format="base64")))
    src = write_jsonl(tmp_path / "embed.jsonl", lines)
    s = Server(cli_env, "--api-key", KEY, "--state-dir", tmp_path / "state", "--max-model-len", 256,
               "--embedding-model", "default", "--max-file-mb", 1, "--max-batch-requests", 8)
    try:
        c = s.client()
        f = c.files.create(file=("embed.jsonl", src.read_bytes()), purpose="batch")
        b = wait_final(c, c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                                           completion_window="24h").id)
        assert b.status == "completed", b.errors
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (8, 6, 2)
        out = jsonl(c.files.content(b.output_file_id).text)
        assert [r["custom_id"] for r in out] == [f"e{i}" for i in range(5)] + ["e-b64"]
        online = c.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
        for r, want in zip(out, online.data):
            got = r["response"]["body"]["data"][0]["embedding"]
            assert max(abs(x - y) for x, y in zip(got, want.embedding)) < 1e-5
        assert isinstance(out[-1]["response"]["body"]["data"][0]["embedding"], str)  # base64, as asked
        tokens = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in out)
        assert b.usage.input_tokens == tokens > 0 and b.usage.output_tokens == 0 and b.usage.total_tokens == tokens
        errors = jsonl(c.files.content(b.error_file_id).text)
        assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("c0", "mismatched_endpoint"),
                                                                          ("e-other", "model_not_found")]
        # the limits: a file over --max-file-mb, a batch over --max-batch-requests
        with pytest.raises(openai.BadRequestError, match="larger than this server's limit") as e:
            c.files.create(file=("big.jsonl", b"x" * (3 << 20)), purpose="batch")
        assert e.value.code == "file_too_large"
        many = c.files.create(file=("many.jsonl", src.read_bytes() + src.read_bytes()), purpose="batch")
        with pytest.raises(openai.BadRequestError, match="more than 8 lines") as e:
            c.batches.create(input_file_id=many.id, endpoint="/v1/embeddings", completion_window="24h")
        assert e.value.code == "too_many_requests"
    finally:
        s.stop()
