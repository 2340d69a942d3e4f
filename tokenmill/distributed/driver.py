"""``tokenmill run --ray`` / ``tokenmill embed --ray``: one job over the workers of a Ray cluster.

The driver does what a single-machine job does up to the engine (lock, manifest, resume bookkeeping, the
validation pass and its error records, the memory plan), then cuts the remaining valid requests into shards and
hands them to Ray actors (``distributed/worker.py``, started and replaced by ``distributed/pool.py``), one engine
each, through the shard queue (``distributed/queue.py``): free workers pull, lost workers' shards go back, stragglers
get a second copy. Each shard is committed by its worker under ``OUTPUT.shards/`` (``distributed/store.py``). When
every shard is in, the driver merges them into OUTPUT (input order for JSONL; Parquet in commit order, as a
single-machine job leaves it), writes the summary and the state file, and removes the shards.

Requests travel to the workers already tokenised (``Prepared`` / ``EmbedPrepared``), so a worker needs the model
and the shared output directory, not the input file. A driver killed at any point resumes with the same command:
committed shards count as done, the rest is cut into new shards.

Invariants: every valid id of the input ends up in OUTPUT exactly once (a shard commits once per name; the merge
keeps an id's first record), every bad line has one error record; rows of a shard given up after
``max_shard_retries`` lost workers get a ``shard_failed`` error record, which the next start removes to retry them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.distributed.cluster import connect
from tokenmill.distributed.kinds import EmbedKind, GenerationKind
from tokenmill.distributed.pool import WorkerPool, cluster_shape, ray_cause
from tokenmill.distributed.queue import Shard, ShardQueue
from tokenmill.distributed.store import ShardStore, shard_ids
from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.files import JobPaths, fsync_path
from tokenmill.jobs.progress import Progress, StopFlag
from tokenmill.jobs.records import JobError
from tokenmill.jobs.scan import scan
from tokenmill.jobs.skeleton import (
    ErrorRecords,
    JobRun,
    check_output,
    complete_outputs,
    job_input,
    note,
    run_locked,
    summary_tail,
)
from tokenmill.jobs.state import format_duration

SHARDS_PER_WORKER = 8  # default shard size: about this many shards per worker (a lost one re-runs 1/8 of a share)
MAX_SHARD_WORK = 2_000_000  # ... and at most this many tokens (prompt + max_tokens) in one shard
MIN_SHARD_ROWS = 8
POLL_SECONDS = 0.5


@dataclass
class RayOptions:
    address: str  # a Ray address, "auto" (this machine's cluster or RAY_ADDRESS) or "local" (start one)
    num_workers: int | None = None  # default: one per node (one per GPU on a GPU cluster)
    shard_size: int | None = None  # rows per shard; default from the dataset (see default_shard_size)
    max_shard_retries: int = 3
    reissue: bool = True  # straggler copies once the queue is empty


def default_shard_size(num_rows: int, num_workers: int, work_per_row: float) -> int:
    """About SHARDS_PER_WORKER shards per worker, at most MAX_SHARD_WORK tokens and at least MIN_SHARD_ROWS rows."""
    size = math.ceil(num_rows / max(1, num_workers * SHARDS_PER_WORKER))
    size = min(size, max(1, int(MAX_SHARD_WORK / max(work_per_row, 1.0))))
    return max(MIN_SHARD_ROWS, size)


def run_distributed(kind: str, opts, ray_opts: RayOptions, stop: StopFlag | None = None) -> int:
    """Runs (or resumes) a ``run`` or ``embed`` job on Ray; returns the exit code as ``run_job`` does. Raises
    JobSetupError before anything runs, JobFault for a fault part way."""
    opts.output = Path(opts.output)
    check_output(opts.output)
    if ray_opts.num_workers is not None and ray_opts.num_workers < 1:
        raise JobSetupError(f"--num-workers must be >= 1, got {ray_opts.num_workers}")
    if ray_opts.shard_size is not None and ray_opts.shard_size < 1:
        raise JobSetupError(f"--shard-size must be >= 1, got {ray_opts.shard_size}")
    if ray_opts.max_shard_retries < 0:
        raise JobSetupError(f"--max-shard-retries must be >= 0, got {ray_opts.max_shard_retries}")
    job = GenerationKind(opts) if kind == "run" else EmbedKind(opts)
    ray = connect(ray_opts.address)
    try:
        return run_locked(opts.output, lambda paths: _drive(job, opts, ray_opts, paths, ray, stop or StopFlag()))
    finally:
        ray.shutdown()


def _drop_shard_failed(paths: JobPaths) -> int:
    """Removes the ``shard_failed`` error records of an earlier start, so their rows are retried."""
    if not paths.errors.exists():
        return 0
    lines = paths.errors.read_bytes().splitlines(keepends=True)
    keep = [ln for ln in lines if not ln.strip() or json.loads(ln).get("code") != "shard_failed"]
    if len(keep) == len(lines):
        return 0
    tmp = paths.errors.with_name(f".{paths.errors.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"".join(keep))
    fsync_path(tmp)
    os.replace(tmp, paths.errors)
    return len(lines) - len(keep)


def _drive(job, opts, ray_opts: RayOptions, paths: JobPaths, ray, stop: StopFlag) -> int:
    with job_input(opts, paths, job.fields, job.manifest, job.extra_files(), ray=True) as source:
        return _Driver(job, opts, ray_opts, paths, ray, stop, source).run()


class _Driver(JobRun):
    """A job over a Ray cluster: ``JobRun``'s steps with the work done by workers, shard by shard."""

    def __init__(self, job, opts, ray_opts: RayOptions, paths: JobPaths, ray, stop: StopFlag, source) -> None:
        super().__init__(opts, paths, source, stop)
        self.job, self.ray_opts, self.ray = job, ray_opts, ray
        self.store = ShardStore(paths.output)
        self.run_token = f"{int(time.time()):x}{os.getpid():x}"
        self.pool = WorkerPool(ray, job.name, self.store.dir, self.run_token, ray_opts.max_shard_retries + 2)
        self.items: dict[int, list] = {}  # shard id -> its prepared requests, until committed or given up
        self.refs: dict[int, object] = {}  # shard id -> the requests in Ray's object store
        self.total = self.done = 0
        self.shards_total = self.shards_done = 0
        self.run_rows = self.run_prompt = self.run_gen = 0
        self.run_deduplicated = 0  # committed rows a worker wrote with an identical row's output
        self.shard_seconds: list[float] = []  # committed shards' times (the fleet simulator's input)
        self.queue: ShardQueue | None = None
        self.t_loop = time.perf_counter()
        self.num_threads = 1  # each worker's
        self.num_nodes = 0
        self.shard_size = 0
        retried = _drop_shard_failed(paths)  # resume: what earlier starts committed, and their error records
        self.store.prepare()
        self.done_ids = job.done_ids(paths)
        for shard in self.store.committed():
            self.done_ids.update(shard_ids(shard, job.key))
        self.errors = ErrorRecords(paths)
        if self.done_ids or self.errors.done_lines:
            note(opts.quiet, f"resuming: {len(self.done_ids)} rows done and {len(self.errors.done_lines)} error "
                             f"records already written" + (f"; {retried} rows of failed shards run again" if retried
                                                           else ""))
        self.done = len(self.done_ids)

    # ------------------------------------------------------------------ JobRun's steps
    def closers(self) -> list:
        return [self.errors.appender]

    def validate(self):
        job = self.job
        signatures = job.signatures()
        scanned = scan(self.source, job.pre, self.errors, signatures)
        self.errors.appender.sync()
        self.total = scanned.num_valid
        return scanned, job.todo(self.source, scanned, signatures, self.done_ids)

    def work(self, validated) -> int:
        scanned, todo = validated
        return self._distribute(scanned, todo, len(self.done_ids))

    def complete(self, validated) -> tuple[int, int]:
        scanned, _ = validated
        self.state.write({**self.snapshot(), "message": "merging the shards into the output"}, force=True)
        rows, dropped = self.job.finalize(self.paths, self.store, scanned)
        complete_outputs(self.paths, self.errors, self.source)
        self.store.remove()
        return rows, dropped

    # ------------------------------------------------------------------ set-up
    def _cluster_shape(self) -> tuple[int, dict]:
        """(workers to start, Ray resources of one) from the cluster and the options (``pool.cluster_shape``)."""
        n, resources, self.num_threads, self.num_nodes = cluster_shape(self.ray, self.job.device, self.job.tp_size,
                                                                       self.ray_opts.num_workers)
        return n, resources

    # ------------------------------------------------------------------ the loop
    def _shard_source(self, todo: Iterator, shard_size: int) -> Iterator[Shard]:
        """Shards of ``shard_size`` rows (longer where a run of identical rows would straddle the cut)."""
        batch: list = []
        next_id = 0

        def make(items) -> Shard:
            nonlocal next_id
            work = float(sum(len(it.token_ids) + it.max_tokens for it in items))
            shard = Shard(next_id, work, len(items))
            self.items[next_id] = items
            self.refs[next_id] = self.ray.put(items)
            next_id += 1
            return shard

        for item in todo:
            # a full shard is cut before the next row, unless that row repeats the last one (computed once)
            if len(batch) >= shard_size and not self.job.same_work(batch[-1], item):
                yield make(batch)
                batch = []
            batch.append(item)
        if batch:
            yield make(batch)
        self.shards_total = next_id  # runs of identical rows may have made shards longer, and fewer

    def _distribute(self, scanned, todo: Iterator, num_done: int) -> int:
        ray, ro = self.ray, self.ray_opts
        todo_rows = max(0, scanned.num_valid - num_done)
        if todo_rows == 0:
            return 0
        num_workers, resources = self._cluster_shape()
        prompt, max_tokens = scanned.valid_lengths()
        work_per_row = float(prompt.sum(dtype=np.int64) + max_tokens.sum(dtype=np.int64)) / max(1, len(prompt))
        shard_size = ro.shard_size or default_shard_size(todo_rows, num_workers, work_per_row)
        self.shard_size = shard_size
        self.shards_total = math.ceil(todo_rows / shard_size)
        spec = self.job.worker_spec(scanned, self.num_threads)
        from tokenmill.distributed.worker import MIN_SLOTS, slots_for

        num_slots = slots_for(spec["max_num_seqs"], shard_size) if self.job.name == "run" else MIN_SLOTS
        self.state.write({**self.snapshot(), "message": f"starting {num_workers} workers"}, force=True)
        self.pool.start(num_workers, resources, spec, num_slots)
        note(self.opts.quiet, f"Ray: {num_workers} workers ({self.num_threads} threads each) on {self.num_nodes} "
                              f"nodes; {todo_rows} rows to run in {self.shards_total} shards of up to {shard_size}, "
                              f"{num_slots} at a time per worker")
        self.queue = ShardQueue(self._shard_source(todo, shard_size), ro.max_shard_retries, ro.reissue,
                                machine_of=lambda slot: slot.partition(".")[0])
        progress = Progress(self.total, self.done, f"tokenmill {self.job.name} (ray)", self.job.unit, self.opts.quiet,
                            self.opts.progress_interval)
        self.t_loop = time.perf_counter()
        try:
            while not self.queue.finished and self.stop.received is None:
                self._step(progress)
                self.state.write_due(self.snapshot)
        finally:
            progress.close(self.postfix)
            self.pool.kill_all()
        if self.stop.received is None:
            return 0
        running = len(self.queue.running)
        return self.stopped(f"stopped by signal after {self.done}/{self.total} rows; {running} shards in flight "
                            f"will run again on resume ({self.shards_done} committed).")

    def _step(self, progress: Progress) -> None:
        ray, queue, pool = self.ray, self.queue, self.pool
        now = time.monotonic()
        for w, slot in pool.free_slots():  # free slots of ready workers take work
            attempt = queue.assign(slot, now)
            if attempt is None:
                continue
            sid = attempt.shard.shard_id
            w.names[slot] = f"{self.run_token}-{sid:06d}"
            w.tasks[slot] = w.actor.run_shard.remote(w.names[slot], self.refs[sid])
        waiting = pool.waiting()
        if not waiting:
            time.sleep(POLL_SECONDS)
            return
        ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=POLL_SECONDS)
        for ref in ready:
            w, slot = waiting[ref]
            if w.wid not in pool.workers:
                continue  # lost with another of its slots in this round
            if slot is None:
                pool.on_ready(w, ref)
            else:
                self._on_task(w, slot, ref, progress)
        now = time.monotonic()
        for slot, work in pool.poll_progress():
            queue.progress(slot, work, now)

    def _on_task(self, w, slot: str, ref, progress: Progress) -> None:
        queue = self.queue
        now = time.monotonic()
        del w.tasks[slot]
        name = w.names.pop(slot)
        try:
            result = self.ray.get(ref)
        except Exception as e:  # the worker died (or its engine failed): every shard in it is lost
            cause = ray_cause(e)
            reason = f"{type(cause).__name__}: {cause}"
            self.pool.lose(w, reason)
            for i, s in enumerate([slot, *w.tasks]):
                given_up = queue.lost(s, count=i == 0)
                if given_up is not None:
                    self._give_up(given_up, reason)
            self.pool.replace()
            return
        if result["status"] == "committed":
            sid = queue.running[slot].shard.shard_id
            for loser in queue.committed(slot, now):
                other = self.pool.workers.get(loser.partition(".")[0])
                if other is not None and other.names.get(loser) == name:
                    other.actor.cancel.remote(name)
            self.items.pop(sid, None)
            self.refs.pop(sid, None)
            self.shards_done += 1
            self.done += result["rows"]
            self.run_rows += result["rows"]
            self.run_prompt += result["prompt_tokens"]
            self.run_gen += result["gen_tokens"]
            self.run_deduplicated += result.get("deduplicated", 0)
            self.shard_seconds.append(round(result["seconds"], 3))
            progress.update(result["rows"], self.postfix)
        else:  # cancelled, or lost the commit race to another copy
            queue.cancelled(slot)

    def _give_up(self, shard: Shard, reason: str) -> None:
        items = self.items.pop(shard.shard_id)
        self.refs.pop(shard.shard_id, None)
        for it in items:
            req = it.request
            openai = req.kind not in ("plain",)
            self.errors(req.line_no, JobError(
                "shard_failed", f"line {req.line_no}: every worker that ran this row's shard was lost "
                f"({shard.retries + 1} attempts; last: {reason[:200]}); run the same command again to retry it",
                req.record_id, openai))
        self.errors.appender.sync()
        self.shards_done += 1

    # ------------------------------------------------------------------ reporting
    def snapshot(self) -> dict:
        elapsed = time.perf_counter() - self.t_loop
        rate = (self.run_prompt + self.run_gen) / elapsed if elapsed > 0 else 0.0
        rows_s = self.run_rows / elapsed if elapsed > 0 else 0.0
        q = self.queue
        workers = self.pool.describe() if q is not None else []
        snap = {"state": "running", "output": str(self.opts.output), "total": self.total, "done": self.done,
                "failed": self.errors.count if self.errors else 0, "prompt_tok_s": rate if self.job.name == "embed"
                else self.run_prompt / elapsed if elapsed > 0 else 0.0,
                "gen_tok_s": self.run_gen / elapsed if elapsed > 0 else 0.0,
                "prompt_tokens": self.run_prompt, "gen_tokens": self.run_gen,
                "elapsed_s": time.perf_counter() - self.t_start,
                "eta_s": (self.total - self.done) / rows_s if rows_s > 0 else None, "message": None,
                "ray": {"shards_total": self.shards_total, "shards_done": self.shards_done,
                        "reissued": q.stats.reissued if q else 0, "copies_won": q.stats.copies_won if q else 0,
                        "retried": q.stats.retried if q else 0, "workers_lost": q.stats.workers_lost if q else 0,
                        "workers": workers}}
        if self.job.name == "embed":
            snap["kind"] = "embed"
            snap["texts_s"] = rows_s
        return snap

    def postfix(self) -> str:
        s = self.snapshot()
        return (f"shards {self.shards_done}/{self.shards_total}, "
                f"{s['prompt_tok_s'] + s['gen_tok_s']:.0f} tok/s, ETA {format_duration(s['eta_s'])}")

    def summary_lines(self, result: tuple[int, int]) -> list[str]:
        rows, dropped = result
        opts, q = self.opts, self.queue
        wall = time.perf_counter() - self.t_start
        tokens = self.run_prompt + self.run_gen
        failed = self.errors.count
        unit = self.job.unit
        lines = [f"tokenmill: completed {self.done}/{self.total} {unit}s ok, {failed} failed, in "
                 f"{format_duration(wall)} ({wall:.1f} s); {rows} rows in {opts.output}"]
        if q is not None:
            s = q.stats
            lines.append(f"  Ray: {self.pool.num_workers} workers on {self.num_nodes} nodes, {self.shards_total} "
                         f"shards of up to {self.shard_size} rows; {s.reissued} straggler shards re-issued ({s.copies_won} copies "
                         f"won), {s.retried} re-run after {s.workers_lost} lost workers, {s.given_up} given up")
        lines.append(f"  this run: {self.run_prompt:,} input + {self.run_gen:,} output tokens, "
                     f"{tokens / wall if wall > 0 else 0:.1f} tok/s total over the cluster")
        if dropped:
            lines.append(f"  {dropped} duplicate rows from an earlier start's workers were dropped in the merge")
        if self.run_deduplicated:
            lines.append(f"  deduplicated: {self.run_deduplicated:,} rows repeated another row's prompt and sampling "
                         f"in their shard and were computed once")
        # what a generation job buys is output tokens; an embed or score job's, its input tokens
        per_output = self.job.name == "run" and getattr(opts, "task", "generate") != "score"
        throughput = (self.run_gen if per_output else self.run_prompt) / wall if wall > 0 else 0.0
        billed = opts.num_gpus * max(1, self.pool.num_workers)  # every worker, for the whole run
        lines += summary_tail(opts, self.paths, failed, billed, throughput, wall, "output" if per_output else "input")
        return lines

    def final_snapshot(self) -> dict:
        final = self.snapshot()
        final["ray"]["shard_seconds"] = self.shard_seconds[:100_000]
        return final
