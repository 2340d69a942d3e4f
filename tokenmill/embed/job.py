"""``tokenmill embed``: a JSONL corpus through an embedding model into a Parquet file (or OpenAI Batch JSONL),
resumable and observable with the same machinery as ``tokenmill run``.

Order of work: lock OUTPUT -> check/write the manifest -> collect ids already durable -> pass 1 (validate every
line, write error records) -> pass 2 (stream the remaining texts through a window of ``window_tokens`` tokens,
sorted by length and packed into forward passes of at most ``max_batch_tokens`` tokens; vectors made durable as
they finish) -> stitch the Parquet file -> summary.

Invariants: every valid input id ends up in OUTPUT exactly once and every bad line in the errors file exactly once,
across any number of kills and restarts; at most one window of texts is held in memory.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.embed.embedder import DEFAULT_MAX_BATCH_TOKENS, Embedder
from tokenmill.embed.preprocess import EmbedPrepared, EmbedPreprocessor
from tokenmill.embed.vectors import OpenAIVectorSink, ParquetVectorSink, parts_dir
from tokenmill.jobs.cost import cost_line
from tokenmill.jobs.files import JobPaths, JsonlAppender, read_keys, repair_torn_tail, write_json_atomic
from tokenmill.jobs.runner import (
    EXIT_SIGNAL,
    JobSetupError,
    SignalCatcher,
    check_manifest,
    check_paths,
    progress_bar,
    run_locked,
    say,
)
from tokenmill.jobs.scan import iter_todo, scan
from tokenmill.jobs.state import StateFile, format_duration

FORMATS = ("parquet", "openai")


@dataclass
class EmbedOptions:
    input: Path
    output: Path
    model: str | None = None
    normalize: bool | None = None  # None: the model's sentence-transformers config
    pooling: str | None = None  # None: the model's config
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_seq_length: int | None = None
    dtype: str = "auto"
    device: str = "auto"
    format: str = "parquet"
    gpu_hourly_rate: float | None = None
    num_gpus: int = 1
    quiet: bool = False
    overwrite: bool = False

    @property
    def window_tokens(self) -> int:
        return 16 * self.max_batch_tokens


def run_embed_job(opts: EmbedOptions) -> int:
    """Runs (or resumes) an embedding job; returns the exit code. Raises JobSetupError for exit-2 problems."""
    check_paths(opts.input, opts.output)
    if opts.format not in FORMATS:
        raise JobSetupError(f"--format must be one of {', '.join(FORMATS)}")
    return run_locked(opts, _run_locked)


def _load(opts: EmbedOptions) -> Embedder:
    try:
        return Embedder(opts.model, dtype=opts.dtype, device=opts.device, max_batch_tokens=opts.max_batch_tokens,
                        pooling=opts.pooling, normalize=opts.normalize, max_seq_length=opts.max_seq_length)
    except (ValueError, TypeError, OSError) as e:
        raise JobSetupError(str(e)) from None


def _run_locked(opts: EmbedOptions, paths: JobPaths) -> int:
    t_start = time.perf_counter()
    emb = _load(opts)
    if opts.overwrite:
        for p in paths.all_files():
            p.unlink(missing_ok=True)
        shutil.rmtree(parts_dir(opts.output), ignore_errors=True)
    manifest = {**emb.describe(), "format": opts.format, "input": str(opts.input.resolve())}
    check_manifest(paths, manifest, compared=("model", "pooling", "normalize", "max_seq_length", "dim", "format"))
    write_json_atomic(paths.manifest, manifest)

    if opts.format == "parquet":
        sink = ParquetVectorSink(opts.output, emb.dim, emb.describe())
    else:
        sink = OpenAIVectorSink(opts.output, emb.model_name)
    repair_torn_tail(paths.errors)
    done_ids = sink.done_ids()
    done_error_lines = read_keys(paths.errors, lambda r: r["line"])
    if (done_ids or done_error_lines) and not opts.quiet:
        say(f"resuming: {len(done_ids)} vectors and {len(done_error_lines)} error records already written")

    errors = JsonlAppender(paths.errors)
    state = StateFile(paths.state)
    num_failed = len(done_error_lines)

    def on_error(line_no, err) -> None:
        nonlocal num_failed
        if line_no not in done_error_lines:
            errors.write(err.to_record(line_no))
            num_failed += 1

    pre = EmbedPreprocessor(emb)
    base = {"kind": "embed", "state": "running", "output": str(opts.output), "total": 0, "done": len(done_ids),
            "failed": num_failed}
    state.write({**base, "message": "validating input"}, force=True)
    scanned = scan(opts.input, pre, on_error)
    errors.sync()
    total = scanned.num_valid
    remaining_tokens = int(np.frombuffer(scanned.prompt_tokens, dtype=np.uint32).sum(dtype=np.int64))
    if not opts.quiet:
        say(f"model {emb.model_name} loaded in {emb.load_seconds:.1f} s ({emb.pooling.describe()}, dim {emb.dim}, "
            f"max {emb.max_seq_length} tokens); {total} texts, max_batch_tokens={emb.max_batch_tokens}")

    def skip_done(line_no: int) -> None:
        nonlocal remaining_tokens
        remaining_tokens -= scanned.prompt_tokens[line_no]

    todo = iter_todo(opts.input, scanned.valid, done_ids, pre, on_skip=skip_done)
    done = len(done_ids)
    run_texts = run_tokens = run_truncated = 0
    bar = progress_bar(total, done, "tokenmill embed", "text", opts.quiet)
    t_engine = time.perf_counter()
    exit_code = 0

    def progress() -> dict:
        elapsed = time.perf_counter() - t_engine
        tok_s = run_tokens / elapsed if elapsed > 0 else 0.0
        return {**base, "total": total, "done": done, "failed": num_failed, "prompt_tok_s": tok_s, "gen_tok_s": 0.0,
                "texts_s": run_texts / elapsed if elapsed > 0 else 0.0, "elapsed_s": time.perf_counter() - t_start,
                "eta_s": remaining_tokens / tok_s if tok_s > 0 else None, "message": None}

    with SignalCatcher() as sig, bar:
        try:
            exhausted = False
            while not exhausted and sig.received is None:
                window: list[EmbedPrepared] = []
                tokens = 0
                for item in todo:
                    window.append(item)
                    tokens += len(item.token_ids)
                    if tokens >= opts.window_tokens:
                        break
                else:
                    exhausted = True
                for batch in emb.plan_batches([len(it.token_ids) for it in window]):
                    if sig.received is not None:
                        break
                    items = [window[i] for i in batch]
                    vectors = emb.forward_packed([it.token_ids for it in items]).cpu().numpy()
                    for it, vec in zip(items, vectors):
                        if isinstance(sink, ParquetVectorSink):
                            sink.write(it.request.id_key, vec)
                        else:
                            sink.write_request(it.request, vec, len(it.token_ids))
                        run_truncated += it.truncated
                    n_tok = sum(len(it.token_ids) for it in items)
                    done += len(items)
                    run_texts += len(items)
                    run_tokens += n_tok
                    remaining_tokens -= n_tok
                    bar.update(len(items))
                    snap = progress()
                    if not opts.quiet:
                        bar.set_postfix_str(f"{snap['texts_s']:.1f} texts/s, {snap['prompt_tok_s']:.0f} tok/s, "
                                            f"ETA {format_duration(snap['eta_s'])}", refresh=False)
                    state.write(snap)
        except BaseException as e:
            sink.close()
            errors.close()
            state.write({**progress(), "state": "failed", "message": f"{type(e).__name__}: {e}"}, force=True)
            raise
        if sig.received is not None:
            exit_code = EXIT_SIGNAL[sig.received]

    sink.close()
    errors.close()
    snap = progress()
    if exit_code:
        state.write({**snap, "state": "interrupted", "message": f"stopped by signal {exit_code - 128}"}, force=True)
        say(f"stopped by signal after {done}/{total} texts (all of them saved). Run the same command again to resume.")
        return exit_code
    state.write({**snap, "message": "writing the output file"}, force=True)
    rows = sink.finalize()
    wall = time.perf_counter() - t_start
    summary = _summary(done, total, num_failed, run_texts, run_tokens, run_truncated, rows, wall, emb, opts)
    state.write({**progress(), "state": "completed", "eta_s": 0, "message": summary.splitlines()[0]}, force=True)
    if not opts.quiet:
        print(summary, file=sys.stderr, flush=True)
    return 0


def _summary(done, total, failed, texts, tokens, truncated, rows, wall, emb: Embedder, opts: EmbedOptions) -> str:
    tok_s = tokens / wall if wall > 0 else 0.0
    lines = [
        f"tokenmill: embedded {done}/{total} texts ok, {failed} failed, in {format_duration(wall)} ({wall:.1f} s); "
        f"{rows} rows in {opts.output}",
        f"  this run: {texts:,} texts, {tokens:,} tokens, {texts / wall if wall > 0 else 0:.1f} texts/s, "
        f"{tok_s:.1f} tok/s; padding {100 * emb.padding_fraction:.1f}% of tokens processed (packed batches)",
        f"  {truncated} texts longer than {emb.max_seq_length} tokens were truncated to it (sentence-transformers "
        f"truncation: the end is cut, special tokens kept)",
    ]
    if opts.gpu_hourly_rate is not None:
        lines.append(cost_line(opts.num_gpus, opts.gpu_hourly_rate, tok_s, wall, "input"))
    return "\n".join(lines)
