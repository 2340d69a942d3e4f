"""ShardWorker without Ray (it is a plain class): the shared-output check, a shard committed once, a second copy
of the same shard losing the commit, and several shards through one engine loop equal to a plain run."""

from __future__ import annotations

import json
import threading

import pytest

from helpers import save_tiny_model
from tokenmill.distributed.worker import OutputNotShared, ShardWorker, slots_for
from tokenmill.jobs.preprocess import Preprocessor


@pytest.fixture(scope="module")
def worker_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("worker")
    save_tiny_model("llama", d / "model")
    shards = d / "out.jsonl.shards"
    shards.mkdir()
    (shards / ".probe-x").write_bytes(b"")
    spec = {"model": str(d / "model"), "max_num_seqs": 4, "num_threads": 1, "model_name": "tiny"}
    return d, shards, ShardWorker("run", spec, str(shards), ".probe-x")


def items(worker: ShardWorker, lines: range) -> list:
    tok = worker.engine.tokenizer
    pre = Preprocessor(tok, worker.engine.config.max_model_len, worker.engine.model_config.vocab_size,
                       {"max_tokens": 12, "temperature": 0})
    raw = [(n, json.dumps({"id": n, "prompt": " ".join(f"w{3 + (n * j) % 250}" for j in range(3 + n % 9))}).encode())
           for n in lines]
    return [it for _, it in pre.process(raw)]


def test_ready_checks_the_shared_output(worker_env, tmp_path):
    """ready() names the worker's process and checks the driver's probe file; outside Ray it starts no Ray cluster
    (ray.get_runtime_context() would start one, on the machine's external interface)."""
    import sys

    d, shards, w = worker_env
    info = w.ready()
    assert info["pid"] > 0 and info["node_id"] is None
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    w2 = ShardWorker.__new__(ShardWorker)
    w2.shard_dir, w2.probe = tmp_path, ".probe-x"  # a directory where the driver's probe is not
    with pytest.raises(OutputNotShared, match="must be on a filesystem every node shares"):
        w2.ready()


def test_shards_through_one_engine_loop_commit_once(worker_env):
    d, shards, w = worker_env
    batches = {"s-000000": items(w, range(1, 9)), "s-000001": items(w, range(9, 20)), "s-000002": items(w, range(20, 23))}
    results = {}

    def run(name):
        results[name] = w.run_shard(name, batches[name])

    threads = [threading.Thread(target=run, args=(n,)) for n in batches]  # all in the worker at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {n: r["status"] for n, r in results.items()} == dict.fromkeys(batches, "committed")
    recs = {}
    for n in batches:
        for line in (shards / f"{n}.jsonl").read_text().splitlines():
            r = json.loads(line)
            recs[r["id"]] = r["completion"]
    assert sorted(recs) == list(range(1, 23))
    # the same requests through an engine loop of their own: the same completions
    from tokenmill.engine.loop import EngineLoop

    loop = EngineLoop(w.engine)
    loop.open_feed("alone", (it.submission() for it in items(w, range(1, 23))))
    alone = {sub.payload.request.record_id: out.text for sub, out in loop.run()}
    assert alone == recs
    # a second copy of a committed shard finds the name taken and commits nothing
    again = w.run_shard("s-000001", batches["s-000001"])
    assert again["status"] in ("lost_race", "cancelled")
    assert sum(1 for _ in (shards / "s-000001.jsonl").read_text().splitlines()) == 11


def test_cancel_stops_a_shard(worker_env):
    d, shards, w = worker_env
    w.cancel("s-000009")
    r = w.run_shard("s-000009", items(w, range(30, 60)))
    assert r["status"] == "cancelled" and not (shards / "s-000009.jsonl").exists()
    assert w.progress() == {}


def test_slots_fill_the_batch():
    assert slots_for(256, 24) == 8 and slots_for(4, 25) == 2 and slots_for(64, 32) == 3
