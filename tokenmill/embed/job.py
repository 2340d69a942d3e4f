"""``tokenmill embed``: a JSONL corpus through an embedding model into a Parquet file (or OpenAI Batch JSONL),
resumable and observable with the same machinery as ``tokenmill run``.

Order of work (the shared skeleton in ``jobs/skeleton.py``): check OUTPUT -> lock -> open the input -> manifest ->
collect ids already durable -> pass 1 (validate every line, write error records) -> pass 2 (stream the remaining
texts through a window of ``window_tokens`` tokens, sorted by length and packed into forward passes of at most
``max_batch_tokens`` tokens; vectors made durable as they finish) -> stitch the Parquet file (rows in completion
order: join on ``id``) or put the OpenAI JSONL in input order -> summary.

Invariants: every valid input id ends up in OUTPUT exactly once and every bad line in the errors file exactly once,
across any number of kills and restarts; at most one window of texts is held in memory.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.kernels.cpu_kernel import build_seconds_so_far
from tokenmill.embed.embedder import DEFAULT_MAX_BATCH_TOKENS, Embedder
from tokenmill.embed.preprocess import EmbedPrepared, EmbedPreprocessor
from tokenmill.embed.records import embed_id_key
from tokenmill.embed.vectors import OpenAIVectorSink, ParquetVectorSink, parts_dir
from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.files import JobPaths, rewrite_in_order
from tokenmill.jobs.inputs import EMBED_FIELDS
from tokenmill.jobs.manifest import build_manifest
from tokenmill.model.fingerprint import model_fingerprint
from tokenmill.jobs.progress import Progress, StopFlag, say
from tokenmill.jobs.scan import iter_todo, scan
from tokenmill.jobs.skeleton import (
    ErrorRecords,
    JobIO,
    JobRun,
    check_output,
    complete_outputs,
    job_input,
    note,
    run_locked,
    summary_tail,
)
from tokenmill.jobs.state import format_duration

FORMATS = ("parquet", "openai")


@dataclass
class EmbedOptions(JobIO):
    model: str | None = None
    normalize: bool | None = None  # None: the model's sentence-transformers config
    pooling: str | None = None  # None: the model's config
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_seq_length: int | None = None
    dtype: str = "auto"
    quantization: str = "none"
    device: str = "auto"
    format: str = "parquet"

    @property
    def window_tokens(self) -> int:
        return 16 * self.max_batch_tokens


@dataclass
class ServedEmbedder:
    """An embedding job on an embedder that already runs: a Batch API batch for ``/v1/embeddings`` on the server
    (``serve/batches.py``). ``lock`` is held for each forward pass (the server's online ``/v1/embeddings`` requests
    take it too, so they wait at most one pass); ``models``: the names a line's ``body.model`` may have;
    ``on_validated(valid rows, bad rows)`` is called after the validation pass."""

    embedder: Embedder
    lock: threading.Lock
    models: set[str]
    on_validated: Callable[[int, int], None] | None = None


def embed_batches(emb: Embedder, todo, window_tokens: int, should_stop=lambda: False, lock=None):
    """The embedding loop as a library: reads ``todo`` (EmbedPrepared) a window of ``window_tokens`` tokens at a
    time, sorts each window by length into packed forward passes, and yields (items, vectors [len(items), dim]
    float32) per pass until ``todo`` is exhausted or ``should_stop()`` (checked before each pass). ``lock``: held
    around each pass (an embedder shared with a server)."""
    lock = lock or contextlib.nullcontext()
    todo = iter(todo)
    exhausted = False
    while not exhausted and not should_stop():
        window: list[EmbedPrepared] = []
        tokens = 0
        for item in todo:
            window.append(item)
            tokens += len(item.token_ids)
            if tokens >= window_tokens:
                break
        else:
            exhausted = True
        for batch in emb.plan_batches([len(it.token_ids) for it in window]):
            if should_stop():
                return
            items = [window[i] for i in batch]
            with lock:
                vectors = emb.forward_packed([it.token_ids for it in items]).cpu().numpy()
            yield items, vectors


def run_embed_job(opts: EmbedOptions, stop: StopFlag | None = None, served: ServedEmbedder | None = None) -> int:
    """Runs (or resumes) an embedding job; returns the exit code (0 / 1 rows failed / 130 / 143 when ``stop`` was
    set). Raises JobSetupError (exit 2) before anything runs, JobFault (exit 3) for a fault part way. ``served``: run
    on an embedder that exists already (else the job loads the model)."""
    opts.output = Path(opts.output)
    if opts.format not in FORMATS:
        raise JobSetupError(f"--format must be one of {', '.join(FORMATS)}")
    check_output(opts.output)
    emb = served.embedder if served is not None else load_embedder(opts)
    return run_locked(opts.output, lambda paths: _run_locked(opts, emb, paths, stop or StopFlag(), served))


def load_embedder(opts: EmbedOptions) -> Embedder:
    try:
        return Embedder(opts.model, dtype=opts.dtype, device=opts.device, max_batch_tokens=opts.max_batch_tokens,
                        pooling=opts.pooling, normalize=opts.normalize, max_seq_length=opts.max_seq_length,
                        quantization=opts.quantization)
    except (ValueError, TypeError, OSError) as e:
        raise JobSetupError(str(e)) from None


def embed_manifest(opts: EmbedOptions, emb: Embedder, input_identity: dict) -> dict:
    d = emb.describe()
    settings = {**{k: d[k] for k in ("model", "pooling", "normalize", "max_seq_length", "dim", "dtype",
                                     "quantization")},
                "model_fingerprint": model_fingerprint(Path(d["model"])), "format": opts.format,
                "columns": [list(c) for c in opts.columns]}
    return build_manifest("embed", input_identity, settings, {"max_batch_tokens": opts.max_batch_tokens})


def _run_locked(opts: EmbedOptions, emb: Embedder, paths: JobPaths, stop: StopFlag,
                served: ServedEmbedder | None) -> int:
    # the job's clock includes loading the model (not for an embedder that was loaded already), not a one-off build
    # of the C++ kernels
    t_start = time.perf_counter() - (0.0 if served else emb.load_seconds - build_seconds_so_far())
    with job_input(opts, paths, EMBED_FIELDS, lambda identity: embed_manifest(opts, emb, identity),
                   (parts_dir(opts.output),)) as source:
        return _EmbedRun(opts, emb, paths, source, t_start, stop, served).run()


class _EmbedRun(JobRun):
    """An embedding job on one machine: ``JobRun``'s steps with an embedder and a vector sink."""

    def __init__(self, opts: EmbedOptions, emb: Embedder, paths: JobPaths, source, t_start: float,
                 stop: StopFlag, served: ServedEmbedder | None = None) -> None:
        super().__init__(opts, paths, source, stop, t_start)
        self.emb, self.served = emb, served
        if opts.format == "parquet":
            self.sink = ParquetVectorSink(opts.output, emb.dim, emb.describe())
        else:
            self.sink = OpenAIVectorSink(opts.output, emb.model_name)
        self.done_ids = self.sink.done_ids()
        self.errors = ErrorRecords(paths)
        if (self.done_ids or self.errors.done_lines) and not opts.quiet:
            say(f"resuming: {len(self.done_ids)} vectors and {len(self.errors.done_lines)} error records already "
                f"written" + (f"; {self.sink.dropped} damaged parts removed (their rows run again)"
                              if getattr(self.sink, "dropped", 0) else ""))
        self.total = self.done = len(self.done_ids)
        self.run_texts = self.run_tokens = self.run_truncated = 0
        self.remaining_tokens = 0
        self.t_engine = time.perf_counter()

    def snapshot(self) -> dict:
        elapsed = time.perf_counter() - self.t_engine
        tok_s = self.run_tokens / elapsed if elapsed > 0 else 0.0
        return {"kind": "embed", "state": "running", "output": str(self.opts.output), "total": self.total,
                "done": self.done, "failed": self.errors.count, "prompt_tok_s": tok_s, "gen_tok_s": 0.0,
                "prompt_tokens": self.run_tokens,
                "texts_s": self.run_texts / elapsed if elapsed > 0 else 0.0,
                "elapsed_s": time.perf_counter() - self.t_start,
                "eta_s": self.remaining_tokens / tok_s if tok_s > 0 else None, "message": None}

    def postfix(self) -> str:
        s = self.snapshot()
        return f"{s['texts_s']:.1f} texts/s, {s['prompt_tok_s']:.0f} tok/s, ETA {format_duration(s['eta_s'])}"

    def closers(self) -> list:
        return [self.sink, self.errors.appender]

    def validate(self):
        opts = self.opts
        pre = EmbedPreprocessor(self.emb, self.served.models if self.served else None)
        scanned = scan(self.source, pre, self.errors)
        self.errors.appender.sync()
        self.total = scanned.num_valid
        if self.served is not None and self.served.on_validated is not None:
            self.served.on_validated(self.total, self.errors.count)
        self.remaining_tokens = int(np.frombuffer(scanned.prompt_tokens, dtype=np.uint32).sum(dtype=np.int64))
        note(opts.quiet, f"model {self.emb.model_name} loaded in {self.emb.load_seconds:.1f} s "
                         f"({self.emb.pooling.describe()}, dim {self.emb.dim}, max {self.emb.max_seq_length} "
                         f"tokens); {self.total} texts, max_batch_tokens={self.emb.max_batch_tokens}")
        self.t_engine = time.perf_counter()
        return scanned, pre

    def complete(self, validated) -> int:
        scanned, _ = validated
        self.state.write({**self.snapshot(), "message": "writing the output file"}, force=True)
        rows = self.sink.finalize()
        if self.opts.format == "openai":
            rewrite_in_order(self.opts.output, lambda r: scanned.line_of(embed_id_key(r["custom_id"])) or 0)
        complete_outputs(self.paths, self.errors, self.source)
        return rows

    def work(self, validated) -> int:
        scanned, pre = validated

        def skip_done(line_no: int) -> None:
            self.remaining_tokens -= scanned.prompt_tokens[line_no]

        todo = iter_todo(self.source, scanned.valid, self.done_ids, pre, on_skip=skip_done)
        sink, stop = self.sink, self.stop
        progress = Progress(self.total, self.done, "tokenmill embed", "text", self.opts.quiet,
                            self.opts.progress_interval)
        try:
            for items, vectors in embed_batches(self.emb, todo, self.opts.window_tokens,
                                                lambda: stop.received is not None,
                                                self.served.lock if self.served else None):
                for it, vec in zip(items, vectors):
                    if isinstance(sink, ParquetVectorSink):
                        sink.write(it.request.id_key, vec)
                    else:
                        sink.write_request(it.request, vec, len(it.token_ids))
                    self.run_truncated += it.truncated
                n_tok = sum(len(it.token_ids) for it in items)
                self.done += len(items)
                self.run_texts += len(items)
                self.run_tokens += n_tok
                self.remaining_tokens -= n_tok
                progress.update(len(items), self.postfix)
                self.state.write_due(self.snapshot)
        finally:
            progress.close(self.postfix)
        if stop.received is None:
            return 0
        return self.stopped(f"stopped by signal after {self.done}/{self.total} texts (all of them saved).")

    def summary_lines(self, rows: int) -> list[str]:
        opts, emb = self.opts, self.emb
        wall = time.perf_counter() - self.t_start
        texts, tokens, failed = self.run_texts, self.run_tokens, self.errors.count
        tok_s = tokens / wall if wall > 0 else 0.0
        lines = [
            f"tokenmill: embedded {self.done}/{self.total} texts ok, {failed} failed, in {format_duration(wall)} "
            f"({wall:.1f} s); {rows} rows in {opts.output}",
            f"  this run: {texts:,} texts, {tokens:,} tokens, {texts / wall if wall > 0 else 0:.1f} texts/s, "
            f"{tok_s:.1f} tok/s; padding {100 * emb.padding_fraction:.1f}% of tokens processed (packed batches)",
            f"  {self.run_truncated} texts longer than {emb.max_seq_length} tokens were truncated to it "
            f"(sentence-transformers truncation: the end is cut, special tokens kept)",
        ]
        lines += summary_tail(opts, self.paths, failed, opts.num_gpus, tok_s, wall, "input")
        return lines
