"""Scale-out on Ray, measured here and simulated past this machine.

Measured, side by side in one run on the same job (SmolLM2-135M, chat prompts, greedy, fixed output length, one
torch thread per engine), alternating the three set-ups for ``--repeats`` rounds:
  - plain ``tokenmill run`` (1 thread);
  - ``tokenmill run --ray local --num-workers 1`` (1 thread): the Ray path's overhead;
  - ``tokenmill run --ray local --num-workers 2`` (1 thread each): scaling efficiency = T(1 worker) / (2 T(2)).
Wall times are the whole command (Ray start-up, actors, model loads included) and the job's own summary wall.

Simulated (``tokenmill/distributed/simulate.py``, the driver's own ShardQueue): fleets of 8 to 512 workers, 16
shards per worker, shard times bootstrapped from the 2-worker run's measured shard times and scaled to a mean of
``--shard-minutes``; one slow node in fifty (3x); spot preemptions at ``--preempt-per-hour`` per worker, back
after 3 minutes. Policies: static partitions, the shard queue, the queue with straggler re-issue; mean over seeds.

Runs itself inside a private network namespace (``unshare --net``, loopback only) so Ray binds 127.0.0.1.

``python -m benchmarks.ray_bench --out benchmarks/results [--rows 192] [--max-tokens 48] [--repeats 2]``
Writes ``ray.json``, ``ray.md`` and ``ray_sim.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.cli_run import run_cli

FLEETS = (8, 32, 128, 512)
POLICIES = ("static", "queue", "queue+reissue")


def in_netns() -> None:
    if os.environ.get("TOKENMILL_BENCH_NETNS") == "1":
        return
    env = {**os.environ, "TOKENMILL_BENCH_NETNS": "1"}
    cmd = " ".join([sys.executable, "-m", "benchmarks.ray_bench", *map(_quote, sys.argv[1:])])
    sys.exit(subprocess.call(["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {cmd}"], env=env))


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


def make_input(path: Path, rows: int, max_tokens: int) -> None:
    rng = random.Random(0)
    topics = ["the sea", "mountains", "bread", "violins", "the moon", "rain", "old maps", "trains", "bees", "glass"]
    with open(path, "w") as f:
        for i in range(rows):
            words = " ".join(rng.choice(topics) for _ in range(rng.randint(1, 30)))
            f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"Write about {words}."}],
                                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}) + "\n")


def run_job(args: list, out: Path) -> dict:
    r = run_cli(args[0], out, *args[1:], "--overwrite")
    job_wall = r.find(r"in [\d:]+ \(([\d.]+) s\)")
    state = json.loads(out.with_name(out.stem + ".state.json").read_text())
    return {"command_wall_s": r.wall_s, "job_wall_s": float(job_wall) if job_wall else None,
            "shard_seconds": state.get("ray", {}).get("shard_seconds", []), "summary": r.stderr.strip()[-600:]}


def measure(work: Path, rows: int, max_tokens: int, repeats: int) -> dict:
    src = work / "in.jsonl"
    make_input(src, rows, max_tokens)
    cfg = work / "one-thread.yaml"
    cfg.write_text("engine:\n  num_threads: 1\n")
    setups = {
        "plain run, 1 thread": ["--config", cfg],
        "--ray local, 1 worker x 1 thread": ["--config", cfg, "--ray", "local", "--num-workers", "1"],
        "--ray local, 2 workers x 1 thread": ["--config", cfg, "--ray", "local", "--num-workers", "2"],
    }
    runs: dict[str, list] = {k: [] for k in setups}
    outputs = {}
    for r in range(repeats):
        for name, args in setups.items():
            out = work / f"out-{len(outputs)}.jsonl"
            res = run_job([src, *args], out)
            runs[name].append(res)
            outputs[name] = out.read_bytes()
            print(f"  round {r + 1} {name}: {res['command_wall_s']:.1f} s (job {res['job_wall_s']:.1f} s)",
                  file=sys.stderr, flush=True)
    same = len(set(outputs.values())) == 1
    best = {k: min(x["command_wall_s"] for x in v) for k, v in runs.items()}
    best_job = {k: min(x["job_wall_s"] for x in v) for k, v in runs.items()}
    names = list(setups)
    return {
        "rows": rows, "max_tokens": max_tokens, "repeats": repeats, "outputs_identical": same,
        "runs": runs, "best_command_wall_s": best, "best_job_wall_s": best_job,
        "scaling_efficiency": best[names[1]] / (2 * best[names[2]]),
        "scaling_efficiency_job": best_job[names[1]] / (2 * best_job[names[2]]),
        "ray_overhead": best[names[1]] / best[names[0]] - 1,
        "ray_overhead_job": best_job[names[1]] / best_job[names[0]] - 1,
        "shard_seconds": runs[names[2]][-1]["shard_seconds"],
    }


def simulate_fleets(shard_seconds: list, shard_minutes: float, preempt_per_hour: float, seeds: int) -> list[dict]:
    from tokenmill.distributed.simulate import simulate

    base = np.asarray(shard_seconds, dtype=float)
    base = base / base.mean() * shard_minutes * 60
    rows = []
    for n in FLEETS:
        for policy in POLICIES:
            ms, cost, reissued = [], [], []
            for seed in range(seeds):
                rng = np.random.default_rng(1000 + seed)
                times = rng.choice(base, size=16 * n, replace=True)
                r = simulate(policy, n, times, preempt_per_hour=preempt_per_hour, seed=seed, hourly_rate=1.0)
                ms.append(r.makespan_s)
                cost.append(r.cost)
                reissued.append(r.reissued)
            rows.append({"workers": n, "policy": policy, "makespan_h": float(np.mean(ms)) / 3600,
                         "worker_hours": float(np.mean(cost)), "reissued": float(np.mean(reissued)),
                         "ideal_h": float(16 * shard_minutes / 60)})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for policy in POLICIES:
        r = [x for x in rows if x["policy"] == policy]
        ax[0].plot([x["workers"] for x in r], [x["makespan_h"] for x in r], marker="o", label=policy)
        ax[1].plot([x["workers"] for x in r], [x["worker_hours"] / x["workers"] for x in r], marker="o", label=policy)
    ax[0].axhline(rows[0]["ideal_h"], color="grey", ls=":", label="no stragglers, no preemptions")
    for a, t in zip(ax, ["makespan (h)", "billed worker-hours per worker"]):
        a.set_xscale("log", base=2)
        a.set_xlabel("workers (16 shards each)")
        a.set_title(t)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--rows", type=int, default=192)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard-minutes", type=float, default=5.0)
    ap.add_argument("--preempt-per-hour", type=float, default=0.2)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    in_netns()
    import tempfile

    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokenmill-ray-bench-") as tmp:
        measured = measure(Path(tmp), a.rows, a.max_tokens, a.repeats)
    sim = simulate_fleets(measured["shard_seconds"], a.shard_minutes, a.preempt_per_hour, a.seeds)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "machine": {"cpus": os.cpu_count()}, "measured": measured, "simulation": sim,
              "sim_params": {"shard_minutes": a.shard_minutes, "preempt_per_hour": a.preempt_per_hour,
                             "seeds": a.seeds, "slow": "1 in 50 at 3x", "restart_s": 180}}
    (a.out / "ray.json").write_text(json.dumps(result, indent=1))
    plot(sim, a.out / "ray_sim.png")
    m = measured
    lines = [f"### Ray scale-out (commit {commit})", "",
             f"{m['rows']} chat rows, {m['max_tokens']} output tokens each, best of {m['repeats']}; outputs identical "
             f"across set-ups: {m['outputs_identical']}", "",
             "| set-up | command wall (s) | job wall (s) |", "|---|---|---|"]
    for k in m["best_command_wall_s"]:
        lines.append(f"| {k} | {m['best_command_wall_s'][k]:.1f} | {m['best_job_wall_s'][k]:.1f} |")
    lines += ["", f"scaling efficiency 1 -> 2 workers: {100 * m['scaling_efficiency']:.1f}% (command), "
                  f"{100 * m['scaling_efficiency_job']:.1f}% (job)",
              f"Ray path overhead, 1 worker vs plain run: {100 * m['ray_overhead']:+.1f}% (command), "
              f"{100 * m['ray_overhead_job']:+.1f}% (job)", "",
              "| workers | policy | makespan (h) | worker-hours billed | straggler copies |", "|---|---|---|---|---|"]
    for r in sim:
        lines.append(f"| {r['workers']} | {r['policy']} | {r['makespan_h']:.2f} | {r['worker_hours']:.0f} | "
                     f"{r['reissued']:.1f} |")
    (a.out / "ray.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
