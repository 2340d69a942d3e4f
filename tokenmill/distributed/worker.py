"""A worker of a distributed job: one engine (or embedder), shards of prepared requests in, committed shard files
out. The driver runs it as a Ray actor (``ray.remote(ShardWorker)``); nothing here imports Ray, prints, exits or
installs a signal handler, so it is a plain library class that a test can also drive in-process.

``run_shard`` returns a dict (``status`` "committed", "lost_race" or "cancelled", rows, tokens, seconds) or raises.
``progress`` and ``cancel`` are called from a second actor thread while a shard runs (the actor has
``max_concurrency=2``): progress is in work units (prompt tokens + max_tokens per request, a finished request
counting its whole max_tokens), the unit the driver's projection of stragglers uses.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from tokenmill.distributed.store import ShardStore, write_jsonl

CANCEL_CHECK_SECONDS = 1.0  # how often a running shard also looks for a copy committed by another worker


class OutputNotShared(RuntimeError):
    """The worker cannot see or write the job's output directory (no shared filesystem)."""


class ShardWorker:
    def __init__(self, kind: str, spec: dict, shard_dir: str, probe: str) -> None:
        """``kind`` "run" or "embed"; ``spec`` the engine options (run: EngineConfig dict plus ``model_name``;
        embed: Embedder keyword arguments plus ``format`` and ``num_threads``); ``probe`` a file the driver wrote
        into ``shard_dir``, which must be visible here."""
        self.kind, self.spec = kind, dict(spec)
        self.shard_dir, self.probe = Path(shard_dir), probe
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._current: str | None = None
        self._done_work = 0.0
        self.engine = self.embedder = None
        if kind == "run":
            from tokenmill.config import EngineConfig
            from tokenmill.engine.llm_engine import LLMEngine

            options = dict(self.spec)
            self.model_name = options.pop("model_name")
            self.engine = LLMEngine(EngineConfig.from_dict(options))
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
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # not under Ray (a test driving the class directly)
            node = None
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node}

    def progress(self) -> tuple[str | None, float]:
        with self._lock:
            return self._current, self._done_work

    def cancel(self, name: str) -> None:
        """Stops shard ``name`` at the next step if it runs (another copy committed it)."""
        with self._lock:
            self._cancelled.add(name)

    def run_shard(self, name: str, items: list) -> dict:
        final = self.shard_dir / f"{name}.{'parquet' if self.kind == 'embed' and self.format == 'parquet' else 'jsonl'}"
        with self._lock:
            self._current, self._done_work = name, 0.0
        t0 = time.perf_counter()
        last_check = [time.monotonic()]

        def should_stop() -> bool:
            if name in self._cancelled:
                return True
            now = time.monotonic()
            if now - last_check[0] >= CANCEL_CHECK_SECONDS:
                last_check[0] = now
                return final.exists()
            return False

        try:
            if self.kind == "run":
                out = self._generate(items, should_stop)
            else:
                out = self._embed(items, should_stop)
            if out is None:
                return {"status": "cancelled", "name": name, "seconds": time.perf_counter() - t0}
            write, stats = out
            committed = ShardStore.commit(write, final)
            return {"status": "committed" if committed else "lost_race", "name": name,
                    "seconds": time.perf_counter() - t0, **stats}
        finally:
            with self._lock:
                self._current = None
                self._cancelled.discard(name)

    def _generate(self, items: list, should_stop):
        from tokenmill.jobs.pump import RequestPump
        from tokenmill.jobs.runner import output_record

        engine = self.engine
        records: list[dict] = []
        prompt = gen = 0
        finished_work = 0.0
        p0, g0 = engine.num_prompt_tokens_done, engine.num_generated_tokens
        pump = RequestPump(engine, iter(items))
        for item, out in pump.run(should_stop):
            records.append(output_record(item, out, self.model_name, engine.tokenizer))
            prompt += out.num_prompt_tokens
            gen += out.num_completion_tokens
            finished_work += item.params.max_tokens - out.num_completion_tokens
            with self._lock:
                self._done_work = (engine.num_prompt_tokens_done - p0) + (engine.num_generated_tokens - g0) + \
                    finished_work
        if len(records) < len(items):
            pump.abort()
            return None
        return write_jsonl(records), {"rows": len(records), "prompt_tokens": prompt, "gen_tokens": gen,
                                      "preemptions": 0}

    def _embed(self, items: list, should_stop):
        import numpy as np

        from tokenmill.embed.job import embed_batches

        emb = self.embedder
        ids: list = []
        vecs: list = []
        tokens = truncated = 0
        for batch, vectors in embed_batches(emb, iter(items), self.window_tokens, should_stop):
            for it, vec in zip(batch, vectors):
                ids.append(it)
                vecs.append(vec)
                tokens += len(it.token_ids)
                truncated += it.truncated
            with self._lock:
                self._done_work = float(tokens)
        if len(ids) < len(items):
            return None
        stats = {"rows": len(ids), "prompt_tokens": tokens, "gen_tokens": 0, "truncated": truncated}
        if self.format == "parquet":
            from tokenmill.embed.vectors import write_vectors

            id_keys = [it.request.id_key for it in ids]
            matrix = np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, emb.dim), np.float32)
            meta = emb.describe()
            return (lambda path: write_vectors(path, id_keys, matrix, meta)), stats
        from tokenmill.embed.records import openai_embedding_record

        name = emb.model_name
        records = [openai_embedding_record(it.request, v, len(it.token_ids), name) for it, v in zip(ids, vecs)]
        return write_jsonl(records), stats
