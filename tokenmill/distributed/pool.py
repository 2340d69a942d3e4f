"""WorkerPool: the Ray actors of a distributed job (``distributed/driver.py`` keeps the shards, the queue and the
accounting; this is the cluster side): the cluster's shape, starting workers, their readiness, a lost worker's
removal and replacement within a budget, and the polling of their progress.

A worker is a ``ShardWorker`` actor (``distributed/worker.py``) with ``num_slots`` shard slots; a slot's id is
``<worker id>.<k>``, the id the shard queue assigns to. Only the driver's thread uses the pool.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenmill.jobs.errors import JobFault, JobSetupError

PROGRESS_POLL_SECONDS = 1.0
NO_WORKER_TIMEOUT = 300.0  # no worker alive or starting for this long: the job stops (exit 3)


@dataclass
class Worker:
    """A Ray actor and its shard slots (queue worker ids ``<wid>.<k>``)."""

    wid: str
    actor: object
    ready_ref: object | None
    info: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)  # slot -> run_shard ObjectRef
    names: dict = field(default_factory=dict)  # slot -> shard name
    progress_ref: object | None = None
    polled_at: float = 0.0
    num_slots: int = 2

    def slots(self) -> list[str]:
        return [f"{self.wid}.{k}" for k in range(self.num_slots)]


def cluster_shape(ray, device: str, tp_size: int, num_workers: int | None) -> tuple[int, dict, int, int]:
    """(workers to start, Ray resources of one, threads of each, nodes) from the cluster and the options: on GPUs a
    worker per tensor-parallel group of ``tp_size`` GPUs, on CPUs one per node (or ``num_workers``) sharing its
    cores."""
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not nodes:
        raise JobSetupError("the Ray cluster has no node with CPUs")
    gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
    if gpus and device != "cpu":
        return num_workers or max(1, gpus // tp_size), {"num_gpus": tp_size, "num_cpus": 1}, 1, len(nodes)
    min_cpus = int(min(n["Resources"]["CPU"] for n in nodes))
    n = num_workers or len(nodes)
    cpus = max(1, min_cpus // math.ceil(n / len(nodes)))
    return n, {"num_cpus": cpus}, cpus, len(nodes)


class WorkerPool:
    def __init__(self, ray, kind: str, store_dir: Path, run_token: str, max_restarts: int) -> None:
        """``kind``: the ShardWorker kind ("run" / "embed"); ``max_restarts``: lost workers replaced at most (beyond
        twice the pool's size)."""
        self.ray, self.kind, self.store_dir, self.run_token = ray, kind, store_dir, run_token
        self.max_restarts = max_restarts
        self.workers: dict[str, Worker] = {}
        self.num_workers = 0  # the pool's size: replacements keep it there
        self.num_started = 0
        self.num_slots = 2
        self.first_error: str | None = None
        self.last_seen = time.monotonic()
        self.resources: dict = {}
        self.spec: dict = {}
        self.probe = ""

    def start(self, num_workers: int, resources: dict, spec: dict, num_slots: int) -> None:
        """Starts the pool: a probe file the workers must see (the output is shared), then the actors."""
        self.num_workers, self.resources, self.spec, self.num_slots = num_workers, resources, spec, num_slots
        self.probe = f".probe-{self.run_token}"
        (self.store_dir / self.probe).write_bytes(b"")
        for _ in range(num_workers):
            self._start_one()

    def _start_one(self) -> None:
        from tokenmill.distributed.worker import ShardWorker

        remote = self.ray.remote(ShardWorker).options(max_concurrency=self.num_slots + 2, max_restarts=0,
                                                      scheduling_strategy="SPREAD", **self.resources)
        actor = remote.remote(self.kind, self.spec, str(self.store_dir), self.probe)
        wid = f"w{self.num_started}"
        self.num_started += 1
        self.workers[wid] = Worker(wid, actor, actor.ready.remote(), num_slots=self.num_slots)

    def replace(self) -> None:
        """Starts a worker in place of a lost one (Ray places it wherever resources are free), within the budget."""
        if len(self.workers) < self.num_workers and self.num_started < 2 * self.num_workers + self.max_restarts:
            self._start_one()

    def free_slots(self):
        """(worker, slot) of every ready worker's idle slots, worker by worker."""
        for w in list(self.workers.values()):
            if w.ready_ref is None:
                for slot in w.slots():
                    if slot not in w.tasks:
                        yield w, slot

    def waiting(self) -> dict:
        """The refs to wait on: ref -> (worker, slot), slot None for a worker's readiness. Raises JobFault when no
        worker has been alive or starting for NO_WORKER_TIMEOUT."""
        out = {}
        for w in self.workers.values():
            if w.ready_ref is not None:
                out[w.ready_ref] = (w, None)
            for slot, ref in w.tasks.items():
                out[ref] = (w, slot)
        if out:
            self.last_seen = time.monotonic()
        elif time.monotonic() - self.last_seen > NO_WORKER_TIMEOUT:
            raise JobFault(f"no Ray worker alive or starting for {NO_WORKER_TIMEOUT:.0f} s"
                           + (f" (last worker error: {self.first_error})" if self.first_error else "")
                           + "; committed shards are kept: run the same command again to resume")
        return out

    def on_ready(self, w: Worker, ref) -> None:
        """A worker's readiness answered: its info, or (it could not start) its removal and a replacement. Raises
        JobSetupError when the output is not shared, JobFault when no worker could start at all."""
        from tokenmill.distributed.worker import OutputNotShared

        w.ready_ref = None
        try:
            w.info = self.ray.get(ref)
        except Exception as e:  # the actor could not start (model load failed, node gone, output not shared)
            cause = ray_cause(e)
            if isinstance(cause, OutputNotShared):
                raise JobSetupError(str(cause)) from None
            self.first_error = self.first_error or f"{type(cause).__name__}: {cause}"
            del self.workers[w.wid]
            if not any(x.info for x in self.workers.values()) and not any(
                    x.ready_ref is not None for x in self.workers.values()) and self.num_started >= self.num_workers:
                raise JobFault(f"no Ray worker could start: {self.first_error}") from None
            self.replace()

    def lose(self, w: Worker, reason: str) -> None:
        """Removes a worker that died (or whose engine failed); the caller puts its shards back, then ``replace``."""
        self.first_error = self.first_error or reason
        self.ray.kill(w.actor, no_restart=True)
        del self.workers[w.wid]

    def poll_progress(self) -> list[tuple[str, float]]:
        """(slot, work done) of the progress answers that came in; asks busy workers again every
        PROGRESS_POLL_SECONDS."""
        now = time.monotonic()
        out = []
        refs = {w.progress_ref: w for w in self.workers.values() if w.progress_ref is not None}
        if refs:
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
            for ref in ready:
                w = refs[ref]
                w.progress_ref = None
                try:
                    work = self.ray.get(ref)
                except Exception:
                    continue
                out += [(slot, work[name]) for slot, name in w.names.items() if name in work]
        for w in self.workers.values():
            if w.tasks and w.progress_ref is None and now - w.polled_at >= PROGRESS_POLL_SECONDS:
                w.progress_ref = w.actor.progress.remote()
                w.polled_at = now
        return out

    def kill_all(self) -> None:
        for w in self.workers.values():
            self.ray.kill(w.actor, no_restart=True)

    def describe(self) -> list[dict]:
        """The workers as the state file shows them."""
        return [{"id": w.wid, "pid": w.info.get("pid"), "host": w.info.get("host"), "node_id": w.info.get("node_id"),
                 "state": "starting" if w.ready_ref is not None else ("busy" if w.tasks else "idle"),
                 "shards": sorted(w.names.values()), "shard": min(w.names.values(), default=None)}
                for w in self.workers.values()]


def ray_cause(e: BaseException) -> BaseException:
    """The user-level exception inside a Ray error (RayTaskError wraps it as ``cause``)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e
