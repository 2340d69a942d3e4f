"""A worker of a distributed job: one engine (or embedder), shards of prepared requests in, committed shard files
out. The driver runs it as a Ray actor (``ray.remote(ShardWorker)``); nothing here imports Ray, prints, exits or
installs a signal handler, so it is a plain library class that a test can also drive in-process.

The driver keeps several shards in a worker at once (``slots``: enough that their requests fill ``max_num_seqs``,
at least two), so its engine never runs dry between shards and small shards still make full batches: for
generation one engine thread (``_ShardLoop``, around the engine's ``EngineLoop``) serves every shard, admitting the
next shard's requests while the previous ones drain; for embeddings the shards run one after the other.

``run_shard`` blocks until its shard is done and returns a dict (``status`` "committed", "lost_race" or
"cancelled", rows, tokens, seconds) or raises. ``progress`` and ``cancel`` are called from other actor threads while
shards run: progress is in work units (prompt tokens + max_tokens per request: finished requests count whole,
running ones by the tokens computed so far), the unit the driver's projection of stragglers uses.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from pathlib import Path

from tokenmill.distributed.store import ShardStore, write_jsonl
from tokenmill.engine.loop import EngineLoop

MIN_SLOTS, MAX_SLOTS = 2, 8  # shards a worker holds at once


def slots_for(max_num_seqs: int, shard_size: int) -> int:
    """Shards a worker holds at once: enough for ``max_num_seqs`` requests plus one shard ready to start."""
    return max(MIN_SLOTS, min(MAX_SLOTS, -(-max_num_seqs // shard_size) + 1))
CANCEL_CHECK_SECONDS = 1.0
PUBLISH_SECONDS = 0.25  # the engine thread refreshes the progress it publishes this often (the driver polls ~1 s)  # how often a running shard also looks for a copy committed by another worker


class OutputNotShared(RuntimeError):
    """The worker cannot see or write the job's output directory (no shared filesystem)."""


class ShardWorker:
    def __init__(self, kind: str, spec: dict, shard_dir: str, probe: str) -> None:
        """``kind`` "run" or "embed"; ``spec`` the engine options (run: EngineConfig dict plus ``model_name``,
        ``score_tokens`` and ``dedupe``;
        embed: Embedder keyword arguments plus ``format`` and ``num_threads``); ``probe`` a file the driver wrote
        into ``shard_dir``, which must be visible here."""
        self.kind, self.spec = kind, dict(spec)
        self.shard_dir, self.probe = Path(shard_dir), probe
        self._lock = threading.Lock()
        self._serial = threading.Lock()
        self._cancelled: set[str] = set()
        self._embed_progress: dict[str, float] = {}
        self.engine = self.embedder = self.loop = None
        if kind == "run":
            from tokenmill.config import EngineConfig
            from tokenmill.engine.llm_engine import LLMEngine

            options = dict(self.spec)
            self.model_name = options.pop("model_name")
            score_tokens = options.pop("score_tokens", False)
            dedupe = options.pop("dedupe", True)
            self.engine = LLMEngine(EngineConfig.from_dict(options))
            self.loop = _ShardLoop(self.engine, self.model_name, score_tokens, dedupe)
        else:
            import torch

            from tokenmill.embed.embedder import Embedder

            options = dict(self.spec)
            self.format = options.pop("format")
            threads = options.pop("num_threads", None)
            if threads:
                torch.set_num_threads(threads)
            self.window_tokens = options.pop("window_tokens")
            self.embedder = Embedder(**options)

    def ready(self) -> dict:
        """Where this worker runs; raises OutputNotShared if the driver's probe file is not visible here."""
        probe = self.shard_dir / self.probe
        if not probe.is_file():
            raise OutputNotShared(f"the worker on {socket.gethostname()} cannot see {self.shard_dir} (no file "
                                  f"{probe.name}): the output directory must be on a filesystem every node shares")
        test = self.shard_dir / f".write-test-{os.getpid()}.tmp"
        try:
            test.write_bytes(b"")
            test.unlink()
        except OSError as e:
            raise OutputNotShared(f"the worker on {socket.gethostname()} cannot write to {self.shard_dir}: "
                                  f"{e.strerror}") from None
        node = None  # not under Ray (a test driving the class directly)
        try:
            import ray

            # ray.get_runtime_context() starts a local Ray cluster in a process that has none: ask only under Ray
            if ray.is_initialized():
                node = ray.get_runtime_context().get_node_id()
        except Exception:  # Ray not installed, or its runtime context unavailable
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node}

    def progress(self) -> dict[str, float]:
        """Work done so far of each shard in this worker."""
        if self.loop is not None:
            return self.loop.progress()
        with self._lock:
            return dict(self._embed_progress)

    def cancel(self, name: str) -> None:
        """Stops shard ``name`` at the next step if it runs (another copy committed it)."""
        with self._lock:
            self._cancelled.add(name)

    def _final(self, name: str) -> Path:
        ext = "parquet" if self.kind == "embed" and self.format == "parquet" else "jsonl"
        return self.shard_dir / f"{name}.{ext}"

    def run_shard(self, name: str, items: list) -> dict:
        final = self._final(name)
        t0 = time.perf_counter()
        try:
            if self.kind == "run":
                out = self.loop.run(name, items, final, lambda: name in self._cancelled)
            else:
                with self._serial:  # one shard at a time through the embedder
                    out = self._embed(name, items, final)
            if out is None:
                return {"status": "cancelled", "name": name, "seconds": time.perf_counter() - t0}
            write, stats = out
            committed = ShardStore.commit(write, final)
            return {"status": "committed" if committed else "lost_race", "name": name,
                    "seconds": time.perf_counter() - t0, **stats}
        finally:
            with self._lock:
                self._cancelled.discard(name)
                self._embed_progress.pop(name, None)

    def _embed(self, name: str, items: list, final: Path):
        import numpy as np

        from tokenmill.embed.job import embed_batches

        emb = self.embedder
        done: list = []
        vecs: list = []
        tokens = truncated = 0
        last_check = [time.monotonic()]

        def should_stop() -> bool:
            if name in self._cancelled:
                return True
            if time.monotonic() - last_check[0] >= CANCEL_CHECK_SECONDS:
                last_check[0] = time.monotonic()
                return final.exists()
            return False

        for batch, vectors in embed_batches(emb, iter(items), self.window_tokens, should_stop):
            for it, vec in zip(batch, vectors):
                done.append(it)
                vecs.append(vec)
                tokens += len(it.token_ids)
                truncated += it.truncated
            with self._lock:
                self._embed_progress[name] = float(tokens)
        if len(done) < len(items):
            return None
        stats = {"rows": len(done), "prompt_tokens": tokens, "gen_tokens": 0, "truncated": truncated}
        if self.format == "parquet":
            from tokenmill.embed.vectors import write_vectors

            id_keys = [it.request.id_key for it in done]
            matrix = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, emb.dim), np.float32)
            meta = emb.describe()
            return (lambda path: write_vectors(path, id_keys, matrix, meta)), stats
        from tokenmill.embed.records import openai_embedding_record

        model = emb.model_name
        records = [openai_embedding_record(it.request, v, len(it.token_ids), model) for it, v in zip(done, vecs)]
        return write_jsonl(records), stats


class _Shard:
    """A shard inside the engine loop: its requests, the records of the finished ones, and when it is done."""

    def __init__(self, name: str, items: list, final: Path, cancelled) -> None:
        self.name, self.items, self.final, self.cancelled = name, items, final, cancelled
        self.records: list[dict] = []
        self.prompt = self.gen = 0
        self.deduplicated = 0  # rows written with an identical row's output
        self.finished_work = 0.0
        self.outcome: str | None = None  # "done" / "cancelled" / "failed"
        self.error: BaseException | None = None
        self.event = threading.Event()
        self.last_check = time.monotonic()


class _ShardLoop:
    """One thread owns the engine and runs every shard of the worker through one ``EngineLoop``: each shard is a
    feed, admitted in arrival order into the loop's window, so the next shard's requests fill the batch while the
    previous shard's last requests finish. A row identical to one of its shard in flight waits on it and is written
    with its output, as in a single-machine run (the driver keeps identical rows in one shard). Only the engine
    thread touches the engine and the loop; ``progress`` reads what that thread publishes after each step.
    Invariant: every shard handed in ends exactly once: done (every row has its record), cancelled or failed."""

    def __init__(self, engine, model_name: str, score_tokens: bool = False, dedupe: bool = True) -> None:
        self.engine, self.model_name, self.score_tokens, self.dedupe = engine, model_name, score_tokens, dedupe
        self.loop = EngineLoop(engine)
        self.inbox: queue.Queue = queue.Queue()
        self.shards: dict[str, _Shard] = {}  # engine thread only
        self._progress: dict[str, float] = {}  # shard -> work done, as the engine thread last published it
        self._published_at = 0.0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def run(self, name: str, items: list, final: Path, cancelled):
        """Blocks until shard ``name`` is done; returns (write, stats), or None if it was cancelled."""
        shard = _Shard(name, items, final, cancelled)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
                self._thread.start()
        self.inbox.put(shard)
        shard.event.wait()
        if shard.outcome == "failed":
            raise shard.error
        if shard.outcome == "cancelled":
            return None
        stats = {"rows": len(shard.records), "prompt_tokens": shard.prompt, "gen_tokens": shard.gen,
                 "deduplicated": shard.deduplicated}
        return write_jsonl(shard.records), stats

    def progress(self) -> dict[str, float]:
        with self._lock:
            return dict(self._progress)

    def _run(self) -> None:
        loop = self.loop
        while True:
            block = not loop.busy
            try:
                while True:
                    self._open(self.inbox.get(block=block))
                    block = False
            except queue.Empty:
                pass
            try:
                self._drop_cancelled()
                for sub, out in loop.step().finished:
                    self._finish(sub, out)
                for s in [s for name, s in self.shards.items() if name not in loop.feeds]:
                    self._close(s, "done")  # its feed is read and every request of it finished
                self._publish()
            except BaseException as e:  # an engine fault fails every shard in the worker; the driver re-runs them
                try:
                    loop.close_all()
                except BaseException:
                    pass
                for s in list(self.shards.values()):
                    self._close(s, "failed", e)

    def _open(self, shard: _Shard) -> None:
        if shard.name in self.shards:  # the driver never gives one worker two copies of a shard at once
            shard.outcome, shard.error = "failed", RuntimeError(f"shard {shard.name} is already running here")
            shard.event.set()
            return
        self.shards[shard.name] = shard
        self.loop.open_feed(shard.name, (it.submission() for it in shard.items), dedupe=self.dedupe)

    def _finish(self, sub, out) -> None:
        from tokenmill.jobs.runner import output_record

        s = self.shards[sub.feed]
        item = sub.payload
        s.records.append(output_record(item, out, self.model_name, self.engine.tokenizer, self.score_tokens))
        s.finished_work += out.num_prompt_tokens + item.max_tokens
        if sub.follows:  # written with an identical row's output: no work of its own
            s.deduplicated += 1
            return
        s.prompt += out.num_prompt_tokens
        s.gen += out.num_generated_tokens if item.score_from is None else 0  # a score row's token is unused

    def _publish(self) -> None:
        """Each shard's work done (finished rows whole, running ones by their computed tokens), for ``progress``:
        a pass over every running request, so between two steps only every PUBLISH_SECONDS."""
        now = time.monotonic()
        if now - self._published_at < PUBLISH_SECONDS:
            return
        self._published_at = now
        out = {}
        for name, s in self.shards.items():
            feed = self.loop.feeds.get(name)
            running = feed.in_engine if feed is not None else {}
            out[name] = s.finished_work + sum(self.engine.num_computed_tokens(rid) for rid in running)
        with self._lock:
            self._progress = out

    def _drop_cancelled(self) -> None:
        now = time.monotonic()
        for s in list(self.shards.values()):
            stop = s.cancelled()
            if not stop and now - s.last_check >= CANCEL_CHECK_SECONDS:
                s.last_check = now
                stop = s.final.exists()  # another copy committed it
            if stop:
                self.loop.close_feed(s.name)  # the rows that waited on its requests go with it
                self._close(s, "cancelled")

    def _close(self, s: _Shard, outcome: str, error: BaseException | None = None) -> None:
        self.shards.pop(s.name, None)
        with self._lock:  # no progress reported for a shard that has ended
            self._progress.pop(s.name, None)
        s.outcome, s.error = outcome, error
        s.event.set()
