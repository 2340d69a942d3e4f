"""A Ray job under a fault, run as a script inside a private network namespace with only loopback up (the
``ray_scenario`` fixture starts it with ``unshare --net``), so Ray binds 127.0.0.1 and nothing leaves the machine.

It starts a cluster of Ray node processes on this machine (``ray.cluster_utils.Cluster``, one CPU each), runs
``tokenmill ... --ray ADDRESS`` on it as a subprocess, and injects the fault when the job's own progress says so
(a committed shard and a worker inside ``run_shard``), never after a fixed sleep. Prints one JSON line: the exit
codes, the driver's stderr, and what the fault hit.

Faults: none, kill_worker (SIGKILL a busy worker process), remove_node (the node of a busy worker, not the head),
stop_worker (SIGSTOP a busy worker: a stuck machine; SIGCONT once the job is done), kill_driver (SIGKILL the
driver, then run the same command again).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from ray.cluster_utils import Cluster

POLL = 0.05  # seconds between looks at the job's progress
TIMEOUT = 240


def committed_shards(output: Path) -> int:
    d = output.with_name(output.name + ".shards")
    return sum(1 for p in d.iterdir() if p.suffix in (".jsonl", ".parquet")) if d.is_dir() else 0


def busy_workers() -> list[int]:
    """Worker processes inside ShardWorker.run_shard (Ray names the process after the running method)."""
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ShardWorker.run_shard" in cmd and p.status() != psutil.STATUS_STOPPED:
            pids.append(p.info["pid"])
    return pids


def wait_for(cond, what: str):
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(POLL)
    raise TimeoutError(f"timed out waiting for {what}")


def raylet_pid(node) -> int:
    return node.all_processes["raylet"][0].process.pid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--fault", default="none")
    ap.add_argument("--output", type=Path, required=True)
    ap.add_argument("job", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(a.nodes - 1)]
    cluster.wait_for_nodes()
    job = a.job[1:] if a.job[:1] == ["--"] else a.job
    cmd = [sys.executable, "-m", "tokenmill.cli", *job, "--ray", cluster.address]
    report = {"codes": [], "stderr": [], "fault": a.fault}
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        if a.fault != "none":
            pid = wait_for(lambda: committed_shards(a.output) >= 1 and busy_workers(), "a committed shard")[0]
            if a.fault == "remove_node":
                by_raylet = {raylet_pid(n): n for n in workers}

                def busy_on_worker_node():
                    for w in busy_workers():
                        for anc in psutil.Process(w).parents():
                            if anc.pid in by_raylet:
                                return w, by_raylet[anc.pid]
                    return None

                pid, node = wait_for(busy_on_worker_node, "a busy worker on a non-head node")
                cluster.remove_node(node)
            elif a.fault == "kill_worker":
                os.kill(pid, signal.SIGKILL)
            elif a.fault == "stop_worker":
                os.kill(pid, signal.SIGSTOP)
            elif a.fault == "kill_driver":
                os.kill(proc.pid, signal.SIGKILL)
                _, err = proc.communicate(timeout=TIMEOUT)
                report["codes"].append(proc.returncode)
                report["stderr"].append(err)
                report["shards_before_restart"] = committed_shards(a.output)
                proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
            report["fault_pid"] = pid
        _, err = proc.communicate(timeout=TIMEOUT)
        report["codes"].append(proc.returncode)
        report["stderr"].append(err)
        if a.fault == "stop_worker":
            before = a.output.read_bytes()
            if psutil.pid_exists(pid):
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
            # the driver killed its actors at the end; the stopped one must be gone without touching the output
            report["stopped_worker_gone"] = bool(wait_for(
                lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                "the stopped worker to exit"))
            report["output_unchanged_after_sigcont"] = a.output.read_bytes() == before
    finally:
        cluster.shutdown()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
