"""``tokenmill run``: a JSONL dataset through the engine into a results file, resumable and observable.

Order of work: lock OUTPUT -> check/write the manifest -> repair torn tails and collect what is done -> pass 1
(validate every line, write new error records) -> partition and memory plan -> engine -> pass 2 (stream the
remaining requests into the engine through a bounded window, append each result as it finishes) -> summary.

Invariants: every valid input id of the partition ends up in OUTPUT exactly once and every bad line in the errors
file exactly once, across any number of kills and restarts; at most ``window`` requests are held in memory.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.engine.llm_engine import LLMEngine, resolve_device
from tokenmill.jobs.cost import cost_line
from tokenmill.jobs.files import JobLock, JobPaths, JsonlAppender, read_keys, repair_torn_tail, write_json_atomic
from tokenmill.jobs.planner import MemoryPlan, plan_memory
from tokenmill.jobs.preprocess import Prepared, Preprocessor
from tokenmill.jobs.records import output_id_key, result_record
from tokenmill.jobs.scan import error_in_partition, iter_todo, partition_members, scan
from tokenmill.jobs.state import StateFile, format_duration
from tokenmill.model.loader import load_tokenizer, read_model_config, resolve_dtype, resolve_model_path
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.memory import kv_budget_bytes, kv_bytes_per_block

DEFAULT_MAX_TOKENS = 256
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


class JobSetupError(Exception):
    """A problem the user fixes before the job can start (exit code 2, one line)."""


@dataclass
class JobOptions:
    input: Path
    output: Path
    model: str | None = None
    engine_options: dict = field(default_factory=dict)  # as given (config file + flags); unset ones are planned
    sampling_defaults: dict = field(default_factory=dict)
    partition: int = 0
    total_partitions: int = 1
    gpu_hourly_rate: float | None = None
    num_gpus: int = 1
    quiet: bool = False
    overwrite: bool = False

    def sampling(self) -> dict:
        return {"max_tokens": DEFAULT_MAX_TOKENS, **self.sampling_defaults}


def check_paths(input_path: Path, output: Path) -> None:
    if not input_path.is_file():
        raise JobSetupError(f"input file {input_path} does not exist")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise JobSetupError(f"output directory {parent} does not exist")
    probe = parent / f".tokenmill-write-test-{id(output)}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise JobSetupError(f"output directory {parent} is not writable: {e.strerror}") from None


class JobContext:
    """Model facts needed before the engine exists: tokenizer, resolved config, preprocessor."""

    def __init__(self, model: str | None, engine_options: dict, sampling: dict) -> None:
        try:
            self.config = EngineConfig.from_dict({"model": model, **engine_options})
            self.model_path = resolve_model_path(model)
            cache_dir = Path(self.config.cache_dir) if self.config.cache_dir else None
            hf_dir, self.model_config = read_model_config(self.model_path, cache_dir)
            self.config = self.config.resolve(self.model_config.max_position_embeddings)
            SamplingParams.from_dict(sampling)
        except (ValueError, TypeError) as e:
            raise JobSetupError(str(e)) from None
        self.tokenizer = load_tokenizer(hf_dir)
        self.pre = Preprocessor(self.tokenizer, self.config.max_model_len, self.model_config.vocab_size, sampling)

    @property
    def model_name(self) -> str:
        p = self.model_path
        return p.stem if p.suffix == ".gguf" else p.name

    def plan(self, prompt_lens, max_tokens) -> MemoryPlan:
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(self.config.dtype, device)
        per_block = kv_bytes_per_block(self.model_config, self.config.block_size, dtype)
        if self.config.num_kv_blocks:
            num_blocks = self.config.num_kv_blocks
        else:
            num_blocks = max(0, kv_budget_bytes(self.config, self.model_config, dtype, device)) // per_block
        return plan_memory(prompt_lens, max_tokens, self.config.max_model_len, self.config.block_size, per_block,
                           num_blocks)


def manifest_for(opts: JobOptions, model_path: Path) -> dict:
    return {
        "model": str(model_path.resolve()),
        "sampling_defaults": opts.sampling(),
        "engine_options": dict(sorted(opts.engine_options.items())),
        "partition": opts.partition,
        "total_partitions": opts.total_partitions,
        "input": str(opts.input.resolve()),
    }


COMPARED = ("model", "sampling_defaults", "engine_options", "partition", "total_partitions")


def check_manifest(paths: JobPaths, manifest: dict, compared: tuple[str, ...] = COMPARED) -> None:
    import json

    if not paths.manifest.exists():
        return
    old = json.loads(paths.manifest.read_text())
    diffs = [k for k in compared if old.get(k) != manifest.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: was {old.get(k)!r}, now {manifest.get(k)!r}" for k in diffs)
        raise JobSetupError(
            f"{paths.output} was started with different settings ({detail}); run with the same settings to resume, "
            f"or pass --overwrite to start afresh"
        )


class SignalCatcher:
    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for s in EXIT_SIGNAL:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def say(msg: str) -> None:
    print(f"tokenmill: {msg}", file=sys.stderr, flush=True)


def run_locked(opts, body) -> int:
    """``body(opts, paths)`` under OUTPUT's job lock (one job per output at a time), for ``run`` and ``embed``."""
    paths = JobPaths(opts.output)
    try:
        lock = JobLock(paths.lock)
    except RuntimeError as e:
        raise JobSetupError(f"{e} ({opts.output}); wait for it or stop it first") from None
    try:
        return body(opts, paths)
    finally:
        lock.release()


def progress_bar(total: int, done: int, desc: str, unit: str, quiet: bool) -> tqdm:
    """The job's stderr progress bar; the caller sets its postfix (rates, ETA)."""
    return tqdm(total=total, initial=done, desc=desc, unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")


def run_job(opts: JobOptions) -> int:
    """Runs (or resumes) a job; returns the process exit code. Raises JobSetupError for exit-2 problems."""
    check_paths(opts.input, opts.output)
    if not 0 <= opts.partition < opts.total_partitions:
        raise JobSetupError(f"--partition must be in [0, {opts.total_partitions}), got {opts.partition}")
    return run_locked(opts, _run_locked)


def _run_locked(opts: JobOptions, paths: JobPaths) -> int:
    sampling = opts.sampling()
    ctx = JobContext(opts.model, opts.engine_options, sampling)
    if opts.overwrite:
        for p in paths.all_files():
            p.unlink(missing_ok=True)
    manifest = manifest_for(opts, ctx.model_path)
    check_manifest(paths, manifest)
    write_json_atomic(paths.manifest, manifest)

    repaired = repair_torn_tail(paths.output) + repair_torn_tail(paths.errors)
    done_ids = read_keys(paths.output, output_id_key)
    done_error_lines = read_keys(paths.errors, lambda r: r["line"])
    resuming = bool(done_ids or done_error_lines)
    if resuming and not opts.quiet:
        say(f"resuming: {len(done_ids)} results and {len(done_error_lines)} error records already written"
             + (f" (cut a torn last line of {repaired} bytes)" if repaired else ""))

    state = StateFile(paths.state)
    t_start = time.perf_counter()
    errors = JsonlAppender(paths.errors)
    results = JsonlAppender(paths.output)
    part, nparts = opts.partition, opts.total_partitions
    num_failed = len(done_error_lines)

    def on_error(line_no, err) -> None:
        nonlocal num_failed
        if error_in_partition(line_no, part, nparts) and line_no not in done_error_lines:
            errors.write(err.to_record(line_no))
            num_failed += 1

    base = {"state": "running", "output": str(opts.output), "total": 0, "done": len(done_ids), "failed": num_failed}
    state.write({**base, "message": "validating input"}, force=True)
    scanned = scan(opts.input, ctx.pre, on_error)
    errors.sync()
    members = partition_members(scanned, part, nparts)
    member_lines = np.flatnonzero(np.frombuffer(members, dtype=np.uint8))
    member_prompt = np.frombuffer(scanned.prompt_tokens, dtype=np.uint32)[member_lines]
    member_max = np.frombuffer(scanned.max_tokens, dtype=np.uint32)[member_lines]
    plan = ctx.plan(member_prompt, member_max)

    engine_options = dict(opts.engine_options)
    engine_options.setdefault("max_num_seqs", plan.recommended_max_num_seqs)
    engine_options.setdefault("max_num_batched_tokens", plan.recommended_max_num_batched_tokens)
    try:
        engine = LLMEngine(EngineConfig.from_dict({"model": opts.model, **engine_options}))
    except ConfigError as e:
        raise JobSetupError(str(e)) from None
    if not opts.quiet:
        say(f"model {ctx.model_name} loaded in {engine.load_seconds:.1f} s; {len(member_lines)} requests in this "
             f"partition, max_num_seqs={engine.config.max_num_seqs}, "
             f"max_num_batched_tokens={engine.config.max_num_batched_tokens}")

    total = len(member_lines)
    remaining_prompt = int(member_prompt.sum(dtype=np.int64))
    remaining_max = int(member_max.sum(dtype=np.int64))
    del member_lines, member_prompt, member_max

    def skip_done(line_no: int) -> None:  # a row finished by an earlier run: no work left in it
        nonlocal remaining_prompt, remaining_max
        remaining_prompt -= scanned.prompt_tokens[line_no]
        remaining_max -= scanned.max_tokens[line_no]

    todo = iter_todo(opts.input, members, done_ids, ctx.pre, on_skip=skip_done)

    window = 2 * engine.config.max_num_seqs + 64
    in_flight: dict[str, Prepared] = {}
    done = len(done_ids)
    run_prompt = run_gen = run_max = 0
    bar = progress_bar(total, done, "tokenmill", "req", opts.quiet)
    t_engine = time.perf_counter()
    exhausted = False
    exit_code = 0

    def progress() -> dict:
        elapsed = time.perf_counter() - t_engine
        p_rate = engine.num_prompt_tokens_done / elapsed if elapsed > 0 else 0.0
        g_rate = engine.num_generated_tokens / elapsed if elapsed > 0 else 0.0
        ratio = run_gen / run_max if run_max else 1.0
        work_left = remaining_prompt + remaining_max * ratio
        rate = p_rate + g_rate
        eta = work_left / rate if rate > 0 else None
        return {**base, "total": total, "done": done, "failed": num_failed, "prompt_tok_s": p_rate,
                "gen_tok_s": g_rate, "elapsed_s": time.perf_counter() - t_start, "eta_s": eta, "message": None}

    with SignalCatcher() as sig, bar:
        try:
            while True:
                if sig.received is not None:
                    break
                if not exhausted and engine.scheduler.num_unfinished_requests < window:
                    batch = []
                    for item in todo:
                        batch.append(item)
                        if len(batch) + engine.scheduler.num_unfinished_requests >= window:
                            break
                    else:
                        exhausted = True
                    if engine.config.sort_by_length:
                        batch.sort(key=lambda it: -len(it.token_ids))
                    for item in batch:
                        rid = f"L{item.request.line_no}"
                        in_flight[rid] = item
                        engine.add_request(rid, item.token_ids, item.params)
                if not engine.has_unfinished_requests():
                    if exhausted:
                        break
                    continue
                for out in engine.step():
                    item = in_flight.pop(out.request_id)
                    results.write(result_record(item.request, out.text, out.finish_reason, out.num_prompt_tokens,
                                                out.num_completion_tokens, ctx.model_name))
                    done += 1
                    run_prompt += out.num_prompt_tokens
                    run_gen += out.num_completion_tokens
                    run_max += item.params.max_tokens
                    remaining_prompt -= out.num_prompt_tokens
                    remaining_max -= item.params.max_tokens
                    bar.update(1)
                snap = progress()
                if not opts.quiet:
                    bar.set_postfix_str(
                        f"{snap['prompt_tok_s']:.0f} prompt tok/s, {snap['gen_tok_s']:.0f} gen tok/s, "
                        f"ETA {format_duration(snap['eta_s'])}", refresh=False)
                state.write(snap)
        except BaseException as e:
            results.close()
            errors.close()
            state.write({**progress(), "state": "failed", "message": f"{type(e).__name__}: {e}"}, force=True)
            raise
        if sig.received is not None:
            exit_code = EXIT_SIGNAL[sig.received]
            engine.abort_request(list(in_flight))

    results.close()
    errors.close()
    wall = time.perf_counter() - t_start
    snap = progress()
    if exit_code:
        state.write({**snap, "state": "interrupted", "message": f"stopped by signal {exit_code - 128}"}, force=True)
        say(f"stopped by signal after {done}/{total} requests; {len(in_flight)} in flight dropped. "
             f"Run the same command again to resume.")
        return exit_code
    summary = _summary(done, total, num_failed, run_prompt, run_gen, wall, engine.stats.num_preemptions, opts)
    state.write({**snap, "state": "completed", "eta_s": 0, "message": summary.splitlines()[0]}, force=True)
    if not opts.quiet:
        print(summary, file=sys.stderr, flush=True)
    return 0


def _summary(done, total, failed, prompt_tokens, gen_tokens, wall, preemptions, opts: JobOptions) -> str:
    tok_s = (prompt_tokens + gen_tokens) / wall if wall > 0 else 0.0
    gen_s = gen_tokens / wall if wall > 0 else 0.0
    lines = [
        f"tokenmill: completed {done}/{total} requests ok, {failed} failed, in {format_duration(wall)} "
        f"({wall:.1f} s)",
        f"  this run: {prompt_tokens:,} input + {gen_tokens:,} output tokens, {tok_s:.1f} tok/s total, "
        f"{gen_s:.1f} output tok/s, {preemptions} preemptions",
    ]
    if opts.gpu_hourly_rate is not None:
        lines.append(cost_line(opts.num_gpus, opts.gpu_hourly_rate, gen_s, wall, "output"))
    return "\n".join(lines)
