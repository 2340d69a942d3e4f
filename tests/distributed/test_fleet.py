"""The fleet planner: arithmetic checked against a hand computation, the deadline met with the straggler margin,
and `tokenmill plan --deadline` (given tok/s and --calibrate) end to end on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from helpers import save_tiny_model, write_jsonl
from tokenmill.distributed.driver import default_shard_size
from tokenmill.distributed.fleet import parse_duration, plan_fleet


def test_durations():
    assert parse_duration("12h") == 43200 and parse_duration("90m") == 5400 and parse_duration("1.5h") == 5400
    assert parse_duration("3600") == 3600 and parse_duration("2d") == 172800
    for bad in ("", "h", "-1h", "0", "12 hours"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_plan_meets_the_deadline_with_the_slowest_shard_as_margin():
    rng = np.random.default_rng(0)
    prompt = rng.integers(50, 2000, size=100_000)
    max_tokens = np.full(100_000, 256)
    p = plan_fleet(prompt, max_tokens, tok_per_s=2000.0, deadline_s=3600.0, hourly_rate=2.0, spot_discount=0.7)
    work = float(prompt.sum() + max_tokens.sum())
    assert p.work_tokens == work and p.single_worker_s == pytest.approx(work / 2000)
    assert p.shard_size == default_shard_size(100_000, p.workers, work / 100_000)
    # the slowest shard, cut in input order, is the margin
    per_row = (prompt + max_tokens).astype(float)
    slowest = max(per_row[i:i + p.shard_size].sum() for i in range(0, len(per_row), p.shard_size)) / 2000
    assert p.slowest_shard_s == pytest.approx(slowest)
    # enough workers that the share of each plus the margin fits; one fewer would not
    assert p.single_worker_s / p.workers + p.slowest_shard_s <= 3600
    fewer = p.workers - 1
    size = default_shard_size(100_000, fewer, work / 100_000)
    margin = max(per_row[i:i + size].sum() for i in range(0, len(per_row), size)) / 2000
    assert p.single_worker_s / fewer + margin > 3600
    assert p.cost_on_demand == pytest.approx(p.workers * 2.0 * p.makespan_s / 3600)
    assert p.cost_spot == pytest.approx(p.cost_on_demand * 0.3)
    assert p.num_shards == math.ceil(100_000 / p.shard_size)


def test_a_deadline_shorter_than_one_shard_is_refused():
    with pytest.raises(ValueError, match="shorter than one shard"):
        plan_fleet([10_000] * 10, [10] * 10, tok_per_s=1.0, deadline_s=60.0, hourly_rate=1.0)


def test_plan_deadline_cli(tmp_path, run_cli):
    save_tiny_model("llama", tmp_path / "model")
    rows = [{"id": i, "prompt": " ".join(f"w{3 + (i * 7 + j) % 250}" for j in range(5 + i % 30)),
             "max_tokens": 20, "temperature": 0, "ignore_eos": True} for i in range(120)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    p = run_cli("plan", src, "-m", tmp_path / "model", "--deadline", "30m", "--gpu-hourly-rate", "3",
                "--tok-per-s", "0.5", "--json", check=0)
    plan = json.loads(p.stdout)
    fleet = plan["fleet"]
    work = plan["num_requests"] * (plan["prompt_avg"] + 20)
    assert fleet["work_tokens"] == pytest.approx(work) and fleet["workers"] >= math.ceil(work / 0.5 / 1800)
    p = run_cli("plan", src, "-m", tmp_path / "model", "--deadline", "30m", "--gpu-hourly-rate", "3",
                "--calibrate", check=0)
    assert "measured on a sample here (--calibrate)" in p.stdout and " x max_tokens)" in p.stdout
    for args, msg in [(["--deadline", "1h", "--tok-per-s", "5"], "--gpu-hourly-rate"),
                      (["--deadline", "1h", "--gpu-hourly-rate", "1"], "one of --tok-per-s N or --calibrate"),
                      (["--tok-per-s", "5"], "only with --deadline"), (["--deadline", "soon"], "not a duration")]:
        p = run_cli("plan", src, "-m", tmp_path / "model", *args, check=2)
        assert msg in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("tp,device,workers,resources", [
    (1, "auto", 8, {"num_gpus": 1, "num_cpus": 1}),
    (2, "auto", 4, {"num_gpus": 2, "num_cpus": 1}),  # a worker per tensor-parallel group of GPUs
    (2, "cpu", 2, {"num_cpus": 16}),  # on CPUs a worker per node; its engine's ranks share the node's threads
])
def test_a_ray_worker_takes_its_tensor_parallel_group(tp, device, workers, resources):
    from types import SimpleNamespace

    from tokenmill.distributed.driver import _Driver

    driver = _Driver.__new__(_Driver)
    node = {"Alive": True, "Resources": {"CPU": 16, "GPU": 4}}
    driver.ray = SimpleNamespace(nodes=lambda: [node, dict(node)])
    driver.job = SimpleNamespace(device=device, tp_size=tp)
    driver.ray_opts = SimpleNamespace(num_workers=None)
    assert driver._cluster_shape() == (workers, resources)
