"""`tokenmill run --ray` and `tokenmill embed --ray` on a cluster of Ray node processes on this machine (one CPU
each), in a private network namespace: equal to a single-machine run, and every id exactly once through a worker
SIGKILLed, a node removed, a worker SIGSTOPped (a straggler: re-issued), and the driver SIGKILLed and restarted."""

from __future__ import annotations

import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from helpers import read_jsonl, save_tiny_model, tokenmill_cmd, write_jsonl
from tokenmill.jobs.files import JobPaths

# The tiny model runs a shard in well under a second; at 4 sequences at a time with 150 tokens each a shard takes
# long enough that a fault lands while shards are still in flight (the scenario waits for the job's own progress).
SLOW = "engine:\n  num_threads: 1\nscheduler:\n  max_num_seqs: 4\n"
BAD = ["{not json", json.dumps({"prompt": "w5 w6"})]  # two bad lines: error records, exit 1


@dataclass
class Job:
    input: Path
    model: Path
    config: Path
    reference: dict  # id -> completion of a single-machine run
    bad_lines: list[int]


def _cli(env, *args, timeout=300):
    return subprocess.run(tokenmill_cmd(*args), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory, cli_env) -> Job:
    d = tmp_path_factory.mktemp("ray-tiny")
    save_tiny_model("llama", d / "model")
    rng = random.Random(7)
    rows: list = []
    for i in range(600):
        words = " ".join(f"w{rng.randrange(3, 256)}" for _ in range(rng.randrange(3, 40)))
        rows.append({"id": f"r{i}", "prompt": words, "max_tokens": 150, "temperature": 0, "ignore_eos": True})
    bad_lines = [101, 402]
    lines = [json.dumps(r) for r in rows]
    for n in bad_lines:
        lines.insert(n - 1, BAD[bad_lines.index(n)])
    (d / "in.jsonl").write_text("\n".join(lines) + "\n")
    (d / "slow.yaml").write_text(SLOW)
    ref = d / "single.jsonl"
    p = _cli(cli_env, "run", d / "in.jsonl", "-o", ref, "-m", d / "model", "--config", d / "slow.yaml", "-q")
    assert p.returncode == 1, p.stderr
    return Job(d / "in.jsonl", d / "model", d / "slow.yaml", {r["id"]: r["completion"] for r in read_jsonl(ref)},
               bad_lines)


def check_exactly_once(out: Path, job: Job) -> dict:
    """OUTPUT holds every valid id once, in input order, with the single-machine completion; the errors file the
    bad lines once; the job's shards, lock and stdin spool are gone. Returns the final state file."""
    rows = read_jsonl(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == len(job.reference), f"{len(ids)} rows, {len(set(ids))} distinct"
    assert ids == sorted(ids, key=lambda i: int(i[1:])), "not in input order"
    assert {r["id"]: r["completion"] for r in rows} == job.reference
    paths = JobPaths(out)
    errors = read_jsonl(paths.errors)
    assert sorted(e["line"] for e in errors) == job.bad_lines
    assert not out.with_name(out.name + ".shards").exists()
    assert not paths.lock.exists()
    state = json.loads(paths.state.read_text())
    assert state["state"] == "completed" and state["done"] == len(job.reference)
    return state


def _run_args(job: Job, out: Path) -> list:
    return ["run", job.input, "-o", out, "-m", job.model, "--config", job.config]


def test_three_nodes_no_fault_equal_a_single_machine_run(tiny_job, ray_scenario, tmp_path, run_cli):
    out = tmp_path / "out.jsonl"
    r = ray_scenario(out, *_run_args(tiny_job, out))
    assert r["codes"] == [1], r["stderr"][-1]
    assert "3 workers (1 threads each) on 3 nodes" in r["stderr"][-1]
    state = check_exactly_once(out, tiny_job)
    assert state["ray"]["workers_lost"] == 0 and state["ray"]["shards_done"] == state["ray"]["shards_total"]
    assert len(state["ray"]["shard_seconds"]) == state["ray"]["shards_total"]
    status = run_cli("status", out, check=0).stdout
    assert "state:        completed" in status and f"shards:       {state['ray']['shards_total']} / " in status


@pytest.mark.parametrize("fault", ["kill_worker", "remove_node"])
def test_a_lost_worker_puts_its_shard_back(tiny_job, ray_scenario, tmp_path, fault):
    out = tmp_path / "out.jsonl"
    r = ray_scenario(out, *_run_args(tiny_job, out), fault=fault)
    assert r["codes"] == [1], r["stderr"][-1]
    state = check_exactly_once(out, tiny_job)
    assert state["ray"]["workers_lost"] >= 1 and state["ray"]["retried"] >= 1, state["ray"]
    assert "re-run after" in r["stderr"][-1]


def test_a_stopped_worker_is_overtaken_by_a_reissued_copy(tiny_job, ray_scenario, tmp_path):
    out = tmp_path / "out.jsonl"
    r = ray_scenario(out, *_run_args(tiny_job, out), fault="stop_worker")
    assert r["codes"] == [1], r["stderr"][-1]
    state = check_exactly_once(out, tiny_job)
    assert state["ray"]["reissued"] >= 1 and state["ray"]["copies_won"] >= 1, state["ray"]
    assert r["stopped_worker_gone"] and r["output_unchanged_after_sigcont"]


def test_the_driver_killed_and_restarted_resumes_from_committed_shards(tiny_job, ray_scenario, tmp_path):
    out = tmp_path / "out.jsonl"
    r = ray_scenario(out, *_run_args(tiny_job, out), fault="kill_driver")
    assert r["codes"] == [-9, 1], r["stderr"]
    assert r["shards_before_restart"] >= 1
    assert "resuming:" in r["stderr"][1]
    check_exactly_once(out, tiny_job)


def test_smollm2_on_three_nodes_equals_a_single_machine_run(ray_scenario, tmp_path, cli_env):
    """The real model where the model matters: greedy outputs equal a single-machine run, every id once."""
    rng = random.Random(3)
    topics = ["the sea", "a mountain", "bread", "a violin", "the moon", "rain"]
    rows = [{"id": i, "messages": [{"role": "user", "content": f"Say one short thing about {rng.choice(topics)} "
                                                               f"number {i}."}],
             "max_tokens": 6, "temperature": 0} for i in range(200)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    single = tmp_path / "single.jsonl"
    p = _cli(cli_env, "run", src, "-o", single, "-q")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out.jsonl"
    r = ray_scenario(out, "run", src, "-o", out)
    assert r["codes"] == [0], r["stderr"][-1]
    assert single.read_bytes() == out.read_bytes()


def test_a_score_job_on_three_nodes_equals_a_single_machine_run(ray_scenario, tmp_path, cli_env):
    """`--task score` over Ray: each row's logprobs (prompts, and continuations after a context) as a single run's;
    identical rows are computed once (the driver keeps them in one shard, the worker's loop dedupes them)."""
    rng = random.Random(4)
    words = "the sea river stone bread violin moon rain falcon harbour".split()
    rows = [{"id": i, "prompt": " ".join(rng.choice(words) for _ in range(rng.randint(2, 30)))} for i in range(60)]
    rows += [{"id": f"c{i}", "prompt": "The capital of France is", "continuation": f" {w}"}
             for i, w in enumerate(words)]
    for i in range(0, 10, 2):  # five pairs of identical rows: each pair computed once, whatever the shard cuts
        rows[i + 1]["prompt"] = rows[i]["prompt"]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    single = tmp_path / "single.jsonl"
    p = _cli(cli_env, "run", src, "-o", single, "-q", "--task", "score", "--score-tokens")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out.jsonl"
    r = ray_scenario(out, "run", src, "-o", out, "--task", "score", "--score-tokens", "--shard-size", 16,
                     "--gpu-hourly-rate", 2)
    assert r["codes"] == [0], r["stderr"][-1]
    a = {json.dumps(x["id"]): x for x in map(json.loads, single.read_text().splitlines())}
    b = [json.loads(line) for line in out.read_text().splitlines()]
    assert [json.dumps(x["id"]) for x in b] == list(a)  # every row once, in input order
    for x in b:
        y = a[json.dumps(x["id"])]
        assert x["num_tokens"] == y["num_tokens"] and x["is_greedy"] == y["is_greedy"]
        assert abs(x["logprob"] - y["logprob"]) < 1e-3 and len(x["token_logprobs"]) == x["num_tokens"]
    assert "per million input tokens" in r["stderr"][-1]  # a score job buys scored tokens
    found = re.search(r"deduplicated: (\d+) rows", r["stderr"][-1])
    assert found and int(found.group(1)) == 5, r["stderr"][-1]


def test_embed_on_three_nodes_equals_a_single_machine_run(ray_scenario, tmp_path, cli_env):
    import pyarrow.parquet as pq

    rng = random.Random(5)
    words = "river mill storm violin concerto quantum harbour bread falcon prey dawn kitchen".split()
    rows = [{"id": f"d{i}", "text": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))}
            for i in range(300)]
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    single = tmp_path / "single.parquet"
    p = _cli(cli_env, "embed", src, "-o", single, "-q")
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out.parquet"
    r = ray_scenario(out, "embed", src, "-o", out, "--shard-size", 40)
    assert r["codes"] == [0], r["stderr"][-1]

    def vectors(path):
        t = pq.read_table(path)
        ids = t.column("id").to_pylist()
        assert len(ids) == len(set(ids)) == len(rows)
        return dict(zip(ids, np.asarray(t.column("embedding").to_pylist(), dtype=np.float32)))

    a, b = vectors(single), vectors(out)
    assert set(a) == set(b)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
    assert "8 shards of up to 40" in r["stderr"][-1]


def test_ray_flag_errors_are_one_line_exit_2(tmp_path, cli_env, netns):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    for args, msg in [
        (["--num-workers", "2"], "need --ray"),
        (["--ray", "local", "--partition", "1", "--total-partitions", "2"], "do not mix"),
        (["--ray", "127.0.0.1:1"], "cannot connect to the Ray cluster"),
    ]:
        cmd = " ".join(map(str, tokenmill_cmd("run", src, "-o", tmp_path / "o.jsonl", *args)))
        p = subprocess.run(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {cmd}"], env=cli_env,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (args, p.stderr)
        assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr
