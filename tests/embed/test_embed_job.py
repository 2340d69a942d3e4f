"""`tokenmill embed` end to end on the real all-MiniLM-L6-v2: Parquet output, error records, OpenAI Batch format,
crash-safe resume after real SIGKILLs, status, and the one-line exit-2 errors."""

from __future__ import annotations

import base64
import json
import random
import signal
import subprocess
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import read_jsonl, tokenmill_cmd, write_jsonl
from tokenmill.embed.vectors import ParquetVectorSink, parts_dir, read_vector_metadata

TOPICS = ["the river flooded the old mill after the storm", "a violin concerto in d minor was performed",
          "quantum error correction needs many physical qubits", "the harbour cranes unloaded containers at dawn",
          "sourdough bread rises slowly in a cold kitchen", "the falcon dived on its prey from a great height"]


def corpus(n: int, seed: int = 0, max_words: int = 120) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = TOPICS[i % len(TOPICS)]
        extra = " ".join(rng.choice(base.split()) for _ in range(rng.randint(0, max_words)))
        rows.append({"id": f"doc-{i}", "text": f"{base} {extra}".strip()})
    return rows


def run(env, *args, timeout=300):
    return subprocess.run(tokenmill_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


def read_vectors(path) -> dict[str, np.ndarray]:
    t = pq.read_table(path)
    ids = t.column("id").to_pylist()
    vecs = np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)
    assert len(ids) == len(set(ids)), "an id appears twice"
    return dict(zip(ids, vecs))


BAD_LINES = [
    ("not json at all", "invalid_json"),
    ("[1, 2]", "not_an_object"),
    (json.dumps({"text": "no id"}), "invalid_id"),
    (json.dumps({"id": "doc-3", "text": "same id as an earlier line"}), "duplicate_id"),
    (json.dumps({"id": "no-text"}), "missing_input"),
    (json.dumps({"id": "empty", "text": "   "}), "empty_text"),
    (json.dumps({"id": "num", "text": 42}), "invalid_text"),
    (json.dumps({"id": "big-token", "text": [101, 999999, 102]}), "invalid_text"),
    (json.dumps({"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": {}}), "unsupported_url"),
    (json.dumps({"custom_id": "multi", "method": "POST", "url": "/v1/embeddings",
                 "body": {"input": ["a", "b"]}}), "unsupported_n"),
    (json.dumps({"custom_id": "dims", "method": "POST", "url": "/v1/embeddings",
                 "body": {"input": "x", "dimensions": 64}}), "dimensions_mismatch"),
    (b'{"id": "latin1", "text": "caf\xe9"}', "invalid_utf8"),
]


def test_embed_writes_parquet_errors_and_status(tmp_path, minilm, embed_env):
    rows = corpus(30)
    rows.append({"id": 7, "text": "an integer id"})
    rows.append({"id": "7", "text": "the same id as a string"})  # ids are strings in the vectors file: a duplicate
    rows.append({"id": "long", "text": "word " * 400})
    inp = tmp_path / "in.jsonl"
    with open(inp, "wb") as f:
        for r in rows:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(b"\n")  # blank lines are skipped
        for line, _ in BAD_LINES:
            f.write((line if isinstance(line, bytes) else line.encode()) + b"\n")
    out = tmp_path / "vectors.parquet"
    proc = run(embed_env, "embed", inp, "-o", out, "--max-batch-tokens", 512)
    assert proc.returncode == 1, proc.stderr  # 1: some rows failed
    assert "embedded 32/32 texts ok, 13 failed" in proc.stderr and "vectors.errors.jsonl" in proc.stderr
    assert "1 texts longer than 256 tokens were truncated" in proc.stderr
    assert not parts_dir(out).exists()

    got = read_vectors(out)
    valid = [r for r in rows if r["text"] != "the same id as a string"]
    assert set(got) == {str(r["id"]) for r in valid}
    ref = minilm.encode([r["text"] for r in valid])
    for r, v in zip(valid, ref):
        assert float(got[str(r["id"])] @ v) >= 0.9999
    meta = read_vector_metadata(out)
    assert meta["model_name"] == "all-MiniLM-L6-v2" and meta["pooling"] == "mean" and meta["normalize"] is True
    assert meta["dim"] == 384 and meta["max_seq_length"] == 256

    errors = read_jsonl(tmp_path / "vectors.errors.jsonl")
    codes = {e["line"]: e["code"] for e in errors}
    dup_line = next(i for i, r in enumerate(rows, 1) if r["text"] == "the same id as a string")
    assert codes.pop(dup_line) == "duplicate_id"
    first_bad = len(rows) + 2  # after the blank line
    assert codes == {first_bad + i: code for i, (_, code) in enumerate(BAD_LINES)}

    status = run(embed_env, "status", out)
    assert status.returncode == 0 and "state:        completed" in status.stdout
    assert "texts:        32 / 32 done (100.0%), 13 failed" in status.stdout

    again = run(embed_env, "embed", inp, "-o", out)  # a finished job run again: nothing to do, nothing duplicated
    assert again.returncode == 1, again.stderr
    assert read_vectors(out).keys() == got.keys()
    assert len(read_jsonl(tmp_path / "vectors.errors.jsonl")) == 13

    changed = run(embed_env, "embed", inp, "-o", out, "--no-normalize")
    assert changed.returncode == 2 and "different settings" in changed.stderr and "normalize" in changed.stderr


def test_embed_resumes_after_sigkill(tmp_path, embed_env):
    # big enough that a run outlives its first durable part plus the random delay (~6 s of float32 work on 2 cores)
    inp = write_jsonl(tmp_path / "in.jsonl", corpus(1200, seed=1, max_words=150))
    ref_out = tmp_path / "ref.parquet"
    proc = run(embed_env, "embed", inp, "-o", ref_out, "--max-batch-tokens", 1024, "--quiet")
    assert proc.returncode == 0, proc.stderr
    ref = read_vectors(ref_out)
    assert len(ref) == 1200

    out = tmp_path / "out.parquet"
    cmd = tokenmill_cmd("embed", inp, "-o", out, "--max-batch-tokens", 1024, "--quiet")
    rng = random.Random(5)
    kills = 0
    for _ in range(3):
        before = len(list(parts_dir(out).glob("part-*"))) if parts_dir(out).exists() else 0
        p = subprocess.Popen(cmd, env=embed_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while p.poll() is None and time.monotonic() < deadline:  # wait until this run has made progress durable
            if parts_dir(out).exists() and len(list(parts_dir(out).glob("part-*"))) > before:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # then kill at a random point
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills >= 1, "every run finished before it could be killed: make the corpus bigger"
    proc = run(embed_env, "embed", inp, "-o", out, "--max-batch-tokens", 1024)
    assert proc.returncode == 0, proc.stderr
    assert "resuming:" in proc.stderr
    got = read_vectors(out)
    assert got.keys() == ref.keys()
    assert max(float(np.abs(got[k] - ref[k]).max()) for k in ref) < 1e-5


def test_stitched_parts_are_not_stitched_twice(tmp_path):
    out = tmp_path / "v.parquet"
    sink = ParquetVectorSink(out, 4, {"model": "m"}, part_rows=2)
    for i in range(5):
        sink.write(f"id{i}", np.full(4, i, dtype=np.float32))
    sink.flush()
    kept = sorted(parts_dir(out).glob("part-*.parquet"))[0].read_bytes()
    assert sink.finalize() == 5
    # a crash after the rename but before the parts were removed leaves a part whose rows are in OUTPUT
    parts_dir(out).mkdir()
    (parts_dir(out) / "part-000000.parquet").write_bytes(kept)
    sink2 = ParquetVectorSink(out, 4, {"model": "m"})
    assert sink2.done_ids() == {f"id{i}" for i in range(5)}
    sink2.write("id5", np.zeros(4, dtype=np.float32))
    assert sink2.finalize() == 6
    assert sorted(pq.read_table(out).column("id").to_pylist()) == [f"id{i}" for i in range(6)]


def test_openai_batch_format(tmp_path, minilm, embed_env):
    from openai.types import CreateEmbeddingResponse

    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "all-MiniLM-L6-v2", "input": TOPICS[i % 6] if i % 3 else [TOPICS[i % 6]],
                       "encoding_format": "base64" if i % 2 else "float"}} for i in range(8)]
    inp = write_jsonl(tmp_path / "batch.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = run(embed_env, "embed", inp, "-o", out, "--format", "openai")
    assert proc.returncode == 0, proc.stderr
    recs = read_jsonl(out)
    assert [r["custom_id"] for r in recs] == [f"req-{i}" for i in range(8)]  # input order once complete
    ref = dict(zip([f"req-{i}" for i in range(8)], minilm.encode([TOPICS[i % 6] for i in range(8)])))
    for r in recs:
        assert r["error"] is None and r["response"]["status_code"] == 200
        body = r["response"]["body"]
        emb = body["data"][0]["embedding"]
        if isinstance(emb, str):
            vec = np.frombuffer(base64.b64decode(emb), dtype="<f4")
            body = {**body, "data": [{**body["data"][0], "embedding": vec.tolist()}]}
        parsed = CreateEmbeddingResponse.model_validate(body)
        vec = np.asarray(parsed.data[0].embedding, dtype=np.float32)
        assert vec.shape == (384,) and float(vec @ ref[r["custom_id"]]) >= 0.9999
        assert parsed.usage.prompt_tokens == parsed.usage.total_tokens > 2


@pytest.mark.parametrize("args,message", [
    (["embed", "missing.jsonl", "-o", "v.parquet"], "does not exist"),
    (["embed", "in.jsonl", "-o", "v.parquet", "--model", "no/such/dir"], "does not exist"),
    (["embed", "in.jsonl", "-o", "v.parquet", "--max-batch-tokens", "0"], "max-batch-tokens"),
    (["embed", "in.jsonl", "-o", "nodir/v.parquet"], "does not exist"),
    (["index", "missing.parquet", "-o", "idx"], "does not exist"),
    (["search", "no-index", "query"], "not a tokenmill index"),
])
def test_cli_errors_are_one_line_exit_2(tmp_path, embed_env, args, message):
    write_jsonl(tmp_path / "in.jsonl", corpus(2))
    proc = subprocess.run(tokenmill_cmd(*args), env=embed_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
