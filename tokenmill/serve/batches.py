"""The Batch API's runner on the server: one thread that runs the batches, oldest first, one at a time, on the
server's own engine (docs/BATCH_API.md).

A batch is a ``tokenmill run`` job (``jobs/runner.py``) whose input is the uploaded file, whose output, errors,
manifest and state file live in ``STATE_DIR/batches/<id>/``, and whose engine is the server's (``engine_port.py``:
its rows go in at priority BATCH, behind online requests). Statuses, each set in the store with its timestamp:

    validating -> in_progress -> finalizing -> completed        (the job's validation pass, then its generation)
    validating | in_progress -> failed                          (setup errors: no valid line, a changed model...)
    validating | in_progress -> cancelling -> cancelled         (``cancel``; what finished is kept)
    validating | in_progress -> expired                         (past ``expires_at``; the rest: ``batch_expired``)

Restart: at start every unfinished batch runs again from where its job stopped (the job runner's resume is
exactly-once: its output holds every finished row once, the rest run again). A server that stops (SIGTERM) stops
its batch between two steps and leaves it ``in_progress``; so does an engine that died (the batch resumes when the
server is started again).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from tokenmill.embed.job import EmbedOptions, ServedEmbedder, run_embed_job
from tokenmill.embed.records import EMBEDDINGS_URL
from tokenmill.jobs.errors import JobFault, JobSetupError
from tokenmill.jobs.files import JobPaths, read_keys
from tokenmill.jobs.inputs import RUN_FIELDS, InputSource, InputSpec
from tokenmill.jobs.progress import StopFlag
from tokenmill.jobs.runner import JobContext, JobOptions, run_job
from tokenmill.jobs.state import read_status, request_counts
from tokenmill.serve.async_engine import AsyncEngine
from tokenmill.serve.engine_port import ServedEngine
from tokenmill.serve.state_store import StateStore

log = logging.getLogger("tokenmill")

_EXPIRED = "This request could not be executed before the completion window expired."


class BatchRunner:
    """``embedder``: the server's embedding model and the lock its online requests take (``/v1/embeddings``
    batches run on it, a forward pass at a time), or None when the server has none."""

    def __init__(self, store: StateStore, served: AsyncEngine, model_name: str,
                 embedder: tuple[object, threading.Lock] | None = None) -> None:
        self.store = store
        self.served = served
        self.model_name = model_name  # what a line's body.model may say (or nothing)
        self.embedder = embedder
        self._cv = threading.Condition()
        self._stopping = False
        self._current: tuple[str, StopFlag] | None = None  # the batch running now and its stop flag
        self._why_stop: str | None = None  # "cancel" or "expire": why the current job was stopped
        self._thread = threading.Thread(target=self._loop, name="tokenmill-batches", daemon=True)

    # ---------------------------------------------------------------- from the routes
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """A batch was created: run it when its turn comes."""
        with self._cv:
            self._cv.notify()

    def cancel(self, batch_id: str) -> dict | None:
        """Moves a batch to ``cancelling`` (the runner then stops it and sets ``cancelled``); returns the batch, or
        None if there is none. A batch already final is returned as it is."""
        self.store.set_batch_status(batch_id, "cancelling", ("validating", "in_progress"))
        with self._cv:
            if self._current is not None and self._current[0] == batch_id:
                self._why_stop = "cancel"
                self._current[1].set()
            self._cv.notify()
        return self.store.get_batch(batch_id)

    def stop(self, timeout: float = 60.0) -> None:
        """Server shutdown: the running batch stops between two steps and stays unfinished (it resumes on the next
        start)."""
        with self._cv:
            self._stopping = True
            if self._current is not None:
                self._current[1].set()
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---------------------------------------------------------------- the runner thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.store.unfinished_batches():
                    self._cv.wait(5.0)
                if self._stopping:
                    return
            batch = self.store.unfinished_batches()[0]
            try:
                self._run(batch)
            except Exception:  # a bug here must not stop the other batches: this one fails, with the reason
                log.exception("batch %s failed", batch["id"])
                self._fail(batch["id"], "server_error", "the batch failed inside the server (see its log)")
            if self.served.dead:  # the engine is gone: the batch stays unfinished; a restarted server resumes it
                return

    def _run(self, batch: dict) -> None:
        bid = batch["id"]
        if batch["status"] == "cancelling":  # cancelled before it ran (or by a server that then stopped)
            self._end_stopped(batch, "cancel")
            return
        if batch["status"] == "finalizing":  # the job had completed; registering its files was cut off
            self._finalize(batch)
            return
        if time.time() >= batch["expires_at"]:
            self._end_stopped(batch, "expire")
            return
        output = self.store.batch_output(bid)
        output.parent.mkdir(parents=True, exist_ok=True)
        stop = StopFlag()
        with self._cv:
            if self._stopping:
                return
            self._current, self._why_stop = (bid, stop), None
        if self.store.get_batch(bid)["status"] == "cancelling":  # cancelled since it was picked: stop at once
            self.cancel(bid)
        engine = ServedEngine(self.served, prefix=f"{bid}:")
        timer = threading.Timer(max(0.0, batch["expires_at"] - time.time()), self._expire, (bid, stop))
        timer.daemon = True
        timer.start()
        try:
            self._run_job(batch, engine, output, stop)
        except (JobSetupError, JobFault) as e:
            if self.served.dead:
                return
            self._fail(bid, "invalid_file" if isinstance(e, JobSetupError) else "server_error", str(e))
            return
        finally:
            timer.cancel()
            with self._cv:
                self._current = None
        if stop.received is None:
            self._finalize(self.store.get_batch(bid))
        elif self._why_stop is not None:
            self._end_stopped(self.store.get_batch(bid), self._why_stop)
        # else: the server is stopping; the batch stays in_progress and resumes on the next start

    def _run_job(self, batch: dict, engine: ServedEngine, output: Path, stop: StopFlag) -> None:
        """The batch as a ``tokenmill run`` job on the server's engine, or (``/v1/embeddings``) a ``tokenmill embed``
        job with OpenAI output on its embedder."""
        bid, source = batch["id"], self.store.file_path(batch["input_file_id"])
        on_validated = lambda total, failed: self._validated(bid, total, failed)  # noqa: E731
        if batch["endpoint"] == EMBEDDINGS_URL:
            if self.embedder is None:
                raise JobSetupError("this server has no embedding model (start it with --embedding-model)")
            emb, lock = self.embedder
            served = ServedEmbedder(emb, lock, {emb.model_name}, on_validated)
            run_embed_job(EmbedOptions(input=source, output=output, input_format="jsonl", format="openai",
                                       quiet=True), stop, served)
            return
        ctx = JobContext.served(engine, {"max_tokens": engine.config.max_model_len}, batch["endpoint"],
                                {self.model_name, *(n for n, _ in engine.config.lora_adapters)})
        ctx.on_validated = on_validated
        run_job(JobOptions(input=source, output=output, input_format="jsonl", quiet=True), stop, ctx)

    def _validated(self, bid: str, total: int, failed: int) -> None:
        self.store.set_batch_counts(bid, total + failed, 0, failed)
        if total == 0:
            return  # nothing to run: the job completes at once, and the batch fails in _finalize
        self.store.set_batch_status(bid, "in_progress", ("validating",))

    def _expire(self, bid: str, stop: StopFlag) -> None:
        with self._cv:
            if self._current is not None and self._current[0] == bid:
                self._why_stop = "expire"
                stop.set()

    def _counts(self, bid: str) -> tuple[int, int, int]:
        c = request_counts(read_status(JobPaths(self.store.batch_output(bid)).state))
        return c["total"], c["completed"], c["failed"]

    def _files(self, bid: str) -> dict:
        """The output and error files to register (those with records). Every error-file line is in OpenAI's shape
        (``custom_id``, ``response``, ``error``), a line that was not even JSON included (its custom_id null)."""
        paths = JobPaths(self.store.batch_output(bid))
        files = {}
        if paths.output.exists() and paths.output.stat().st_size > 0:
            files["output_file_id"] = (paths.output, f"{bid}_output.jsonl")
        if paths.errors.exists() and paths.errors.stat().st_size > 0:
            shaped = paths.output.with_name("batch_errors.jsonl")
            with open(shaped, "w", encoding="utf-8") as f:
                for rec in iter_json(paths.errors):
                    rec.setdefault("custom_id", rec.get("id"))
                    rec.setdefault("response", None)
                    rec.setdefault("error", {"code": rec.get("code"), "message": rec.get("message")})
                    f.write(json.dumps(rec) + "\n")
            files["error_file_id"] = (shaped, f"{bid}_error.jsonl")
        return files

    def _finalize(self, batch: dict) -> None:
        bid = batch["id"]
        total, completed, failed = self._counts(bid)
        if completed == 0:  # no line could run: the batch fails, as OpenAI's does in validation
            first = next(iter_json(JobPaths(self.store.batch_output(bid)).errors), None)
            why = f"{failed} errors; the first: {first.get('message')}" if first else "the file has no requests"
            self._fail(bid, "invalid_file", f"no line of the input file is a valid request ({why})",
                       counts=(total, completed, failed))
            return
        self.store.set_batch_status(bid, "finalizing", ("validating", "in_progress"))
        self.store.set_batch_status(bid, "completed", ("finalizing",), files=self._files(bid), total=total,
                                    completed=completed, failed=failed, usage=batch_usage(self.store.batch_output(bid)))

    def _end_stopped(self, batch: dict, why: str) -> None:
        """A cancelled or expired batch: what finished is kept (its output file), the rest is dropped; for expiry
        each unfinished request is listed in the error file with code ``batch_expired``."""
        bid = batch["id"]
        output = self.store.batch_output(bid)
        if why == "expire":
            expired = self._list_expired(batch)
            status, only_from = "expired", ("validating", "in_progress")
        else:
            expired = 0
            status, only_from = "cancelled", ("cancelling",)
        try:
            total, completed, failed = self._counts(bid)
        except (OSError, ValueError):  # it never started
            total, completed, failed = batch["request_counts"].values()
        files = self._files(bid) if output.parent.exists() else {}
        self.store.set_batch_status(bid, status, only_from, files=files, total=max(total, completed + failed + expired),
                                    completed=completed, failed=failed + expired, usage=batch_usage(output))

    def _list_expired(self, batch: dict) -> int:
        """Appends a ``batch_expired`` error record for each request of the input that has no record yet."""
        paths = JobPaths(self.store.batch_output(batch["id"]))
        paths.output.parent.mkdir(parents=True, exist_ok=True)
        done = read_keys(paths.output, lambda r: r.get("custom_id")) if paths.output.exists() else set()
        errored = read_keys(paths.errors, lambda r: r.get("line")) if paths.errors.exists() else set()
        n = 0
        spec = InputSpec(str(self.store.file_path(batch["input_file_id"])), "jsonl", ())
        with InputSource(spec, RUN_FIELDS) as source, open(paths.errors, "a", encoding="utf-8") as err:
            for line_no, raw in source.iter_lines():
                if not isinstance(raw, bytes) or not raw.strip() or line_no in errored:
                    continue
                try:
                    cid = json.loads(raw).get("custom_id")
                except (ValueError, AttributeError):
                    cid = None
                if cid in done:
                    continue
                err.write(json.dumps({"line": line_no, "id": cid, "code": "batch_expired", "message": _EXPIRED,
                                      "custom_id": cid, "response": None,
                                      "error": {"code": "batch_expired", "message": _EXPIRED}}) + "\n")
                n += 1
        return n

    def _fail(self, bid: str, code: str, message: str, counts: tuple[int, int, int] | None = None) -> None:
        fields = {"errors": [{"code": code, "message": message, "param": None, "line": None}]}
        if counts is not None:
            fields.update(total=counts[0], completed=counts[1], failed=counts[2])
        if counts is not None and self.store.batch_output(bid).parent.exists():
            fields["files"] = self._files(bid)
            fields["usage"] = batch_usage(self.store.batch_output(bid))
        self.store.set_batch_status(bid, "failed", ("validating", "in_progress", "finalizing"), **fields)
        log.warning("batch %s failed: %s", bid, message)


def batch_usage(output: Path) -> dict:
    """The batch object's ``usage``: the tokens of every request in its output (chat and completions: prompt and
    completion tokens; embeddings: input tokens). Prefix-cache hits are not counted per request, so
    ``cached_tokens`` is 0."""
    inp = out = 0
    for rec in iter_json(output):
        usage = ((rec.get("response") or {}).get("body") or {}).get("usage") or {}
        inp += int(usage.get("prompt_tokens") or 0)
        out += int(usage.get("completion_tokens") or 0)
    return {"input_tokens": inp, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": inp + out}


def iter_json(path: Path):
    if not path.exists():
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
