"""``tokenmill run``: a dataset through the engine into a results file, resumable and observable.

Order of work (the shared skeleton in ``jobs/skeleton.py``): check OUTPUT -> lock -> open the input -> manifest ->
repair torn tails and collect what is done -> pass 1 (validate every line, write new error records, record each
line's prefix signature) -> partition, memory plan and dataset order -> engine -> pass 2 (stream the remaining
requests into the engine through a bounded window, in input order or, when rows share prefixes or repeat, grouped
by prefix (``jobs/ordering.py``); identical requests are computed once; append each result as it finishes, in
completion order) -> complete: OUTPUT rewritten in input order -> summary.

Invariants: every valid input id of the partition ends up in OUTPUT exactly once and every bad line in the errors
file exactly once, across any number of kills, faults and restarts; at most ``window`` requests are held in memory;
a resume reads the same input bytes with the same output-deciding settings (``jobs/manifest.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.loop import EngineLoop
from tokenmill.engine.model_info import ModelInfo
from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.files import JobPaths, JsonlAppender, rewrite_in_order
from tokenmill.jobs.inputs import RUN_FIELDS
from tokenmill.jobs.manifest import build_manifest, split_engine_options
from tokenmill.model.fingerprint import model_fingerprint
from tokenmill.jobs.ordering import DatasetOrder, PrefixSignatures, iter_job_rows, job_order
from tokenmill.jobs.planner import MemoryPlan, plan_memory
from tokenmill.jobs.preprocess import Prepared, Preprocessor
from tokenmill.jobs.progress import Progress, StopFlag
from tokenmill.jobs.results import choice_contents, output_id_key, result_record, vllm_prompt_logprobs
from tokenmill.jobs.scan import error_in_partition, partition_members, scan
from tokenmill.jobs.skeleton import (
    ErrorRecords,
    JobIO,
    JobRun,
    check_output,
    complete_outputs,
    done_keys,
    job_input,
    note,
    run_locked,
    summary_tail,
)
from tokenmill.jobs.state import format_duration
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.backend import GrammarBackend

__all__ = ["JobOptions", "JobContext", "JobSetupError", "run_job"]

DEFAULT_MAX_TOKENS = 256


@dataclass
class JobOptions(JobIO):
    model: str | None = None
    engine_options: dict = field(default_factory=dict)  # as given (config file + flags); unset ones are planned
    sampling_defaults: dict = field(default_factory=dict)
    partition: int = 0
    total_partitions: int = 1
    context_overflow: str = "error"
    dataset_order: str = "auto"  # "auto": grouped by shared prefix when that pays (jobs/ordering.py); "input"
    dedupe: bool = True  # identical requests computed once
    task: str = "generate"  # or "score": each row's prompt (or continuation) scored, nothing generated
    score_tokens: bool = False  # score: each scored token's logprob in the record too

    def sampling(self) -> dict:
        return {"max_tokens": DEFAULT_MAX_TOKENS, **self.sampling_defaults}


class JobContext:
    """Model facts needed before the engine exists: the model as ``ModelInfo.read`` gives it (resolved config,
    tokenizer, adapters), the grammars and the preprocessor. ``engine``: set when the job runs on an engine that
    exists already (``served``), None when the job loads its own (from the same ModelInfo: nothing read twice)."""

    engine = None
    on_validated = None  # served jobs: called with (valid rows, bad rows) after the validation pass

    def __init__(self, model: str | None, engine_options: dict, sampling: dict, context_overflow: str = "error",
                 task: str = "generate") -> None:
        try:
            self.info = ModelInfo.read(EngineConfig.from_dict({"model": model, **engine_options}))
            defaults = SamplingParams.from_dict(sampling)
            if defaults.lora is not None and defaults.lora not in self.info.lora_names:
                raise ValueError(f"the job's default lora {defaults.lora!r} is not a loaded adapter (--lora NAME=PATH)")
            info = self.info
            self.grammars = GrammarBackend(info.tokenizer, info.model_config.vocab_size, info.eos_token_ids)
            self.pre = Preprocessor(info.tokenizer, info.config.max_model_len, info.model_config.vocab_size, sampling,
                                    context_overflow, self.grammars, task, loras=info.lora_names)
            if defaults.structured is not None:  # the job's own default must compile (else: one line, exit 2)
                self.grammars.compile(defaults.structured)
        except (ValueError, TypeError) as e:
            raise JobSetupError(str(e)) from None

    @classmethod
    def served(cls, engine, sampling: dict, endpoint: str | None = None, models: set[str] | None = None) -> JobContext:
        """A job on an engine that already runs (a Batch API batch on the server: ``serve/engine_port.py``):
        its ModelInfo and grammars, nothing loaded again. ``endpoint``: the url every line must have;
        ``models``: the names a line's model may have."""
        ctx = cls.__new__(cls)
        ctx.engine = engine
        ctx.info, ctx.grammars = engine.info, engine.grammars
        info = ctx.info
        try:
            ctx.pre = Preprocessor(info.tokenizer, engine.config.max_model_len, info.model_config.vocab_size,
                                   sampling, grammars=engine.grammars, endpoint=endpoint, models=models,
                                   loras=info.lora_names)
        except (ValueError, TypeError) as e:
            raise JobSetupError(str(e)) from None
        return ctx

    def plan(self, prompt_lens, max_tokens) -> MemoryPlan:
        per_block, num_blocks = self.info.kv_blocks(weights_loaded=self.engine is not None)
        config = self.info.config
        p = plan_memory(prompt_lens, max_tokens, config.max_model_len, config.block_size, per_block, num_blocks)
        mc = self.info.model_config
        p.parameters, p.active_parameters = mc.num_parameters(), mc.num_parameters(active=True)
        p.weight_gib = self.info.planned_weight_bytes() / 2**30
        p.lora_gib, p.num_loras = self.info.planned_lora_bytes() / 2**30, len(self.info.adapters)
        return p


def output_record(item: Prepared, out, model_name: str, tokenizer, score_tokens: bool = False) -> dict:
    """The OUTPUT line of one finished request (plain or OpenAI Batch shape, with logprobs when asked; a score
    row's scores). A row run with a LoRA adapter names the adapter as its model."""
    req = item.request
    model_name = item.params.lora or model_name
    if item.score_from is not None:
        return score_record(item, out, score_tokens)
    if req.kind == "plain":
        choices = [(s.text, s.finish_reason, None) for s in out.outputs]
        return result_record(req, choices, out.num_prompt_tokens, out.num_completion_tokens, model_name)
    choices, completion_tokens = choice_contents(item, out, tokenizer)
    return result_record(req, choices, out.num_prompt_tokens, completion_tokens, model_name,
                         vllm_prompt_logprobs(item, out, tokenizer))


def score_record(item: Prepared, out, score_tokens: bool) -> dict:
    """A score row's line: the scored tokens' count, the sum and mean of their logprobs, the perplexity
    (exp(-mean)), whether each was the model's most likely token (``is_greedy``, as lm-eval's), the row's tokens."""
    start = item.score_from
    lps = [entry[t] for entry, t in zip(out.prompt_logprobs[start:], item.token_ids[start:])]
    total = sum(lps)
    mean = total / len(lps)
    rec = {"id": item.request.record_id, "num_tokens": len(lps), "logprob": total, "mean_logprob": mean,
           "perplexity": math.exp(-mean), "is_greedy": all(r == 1 for r in out.prompt_token_ranks[start:]),
           "input_tokens": len(item.token_ids)}
    if score_tokens:
        rec["token_logprobs"] = lps
    return rec


def manifest_for(opts: JobOptions, ctx: JobContext, input_identity: dict) -> dict:
    decides, speed = split_engine_options(opts.engine_options)
    for key in ("dtype", "quantization", "max_model_len", "model"):
        decides.pop(key, None)
    settings = {
        "model": str(ctx.info.path.resolve()),
        "model_fingerprint": model_fingerprint(ctx.info.path),
        "dtype": str(ctx.info.dtype).removeprefix("torch."),
        "quantization": ctx.info.config.quantization,
        "max_model_len": ctx.info.config.max_model_len,
        "sampling_defaults": opts.sampling(),
        "context_overflow": opts.context_overflow,
        "engine_options": dict(sorted(decides.items())),
        "partition": opts.partition,
        "total_partitions": opts.total_partitions,
        "columns": [list(c) for c in opts.columns],
        "task": opts.task,
        "score_tokens": opts.score_tokens,
    }
    if ctx.info.config.lora_adapters:  # an adapter is part of what the results answer: its files, not only its path
        settings["lora_fingerprints"] = {n: model_fingerprint(Path(p).expanduser())
                                         for n, p in ctx.info.config.lora_adapters}
    return build_manifest("run", input_identity, settings, speed)


def run_job(opts: JobOptions, stop: StopFlag | None = None, ctx: JobContext | None = None) -> int:
    """Runs (or resumes) a job; returns the process exit code (0 all rows done, 1 some failed, 130/143 when
    ``stop`` was set). Raises JobSetupError (exit 2) before anything runs, JobFault (exit 3) for a fault part way.
    Installs no signal handler: the CLI passes a ``SignalCatcher`` as ``stop``. ``ctx``: a ``JobContext.served``
    to run on an engine that exists already (else the job loads the model)."""
    opts.output = Path(opts.output)
    check_output(opts.output)
    if not 0 <= opts.partition < opts.total_partitions:
        raise JobSetupError(f"--partition must be in [0, {opts.total_partitions}), got {opts.partition}")
    if opts.dataset_order not in ("auto", "input"):
        raise JobSetupError(f"--dataset-order must be auto or input, got {opts.dataset_order!r}")
    if opts.task not in ("generate", "score"):
        raise JobSetupError(f"--task must be generate or score, got {opts.task!r}")
    if ctx is None:
        ctx = JobContext(opts.model, opts.engine_options, opts.sampling(), opts.context_overflow, opts.task)
    return run_locked(opts.output, lambda paths: _run_locked(opts, ctx, paths, stop or StopFlag()))


def _run_locked(opts: JobOptions, ctx: JobContext, paths: JobPaths, stop: StopFlag) -> int:
    with job_input(opts, paths, RUN_FIELDS, lambda identity: manifest_for(opts, ctx, identity)) as source:
        return _Run(opts, ctx, paths, source, stop).run()


class _Run(JobRun):
    """A generation (or score) job on one machine: ``JobRun``'s steps with an engine and its loop."""

    def __init__(self, opts: JobOptions, ctx: JobContext, paths: JobPaths, source, stop: StopFlag) -> None:
        super().__init__(opts, paths, source, stop)
        self.ctx = ctx
        self.done_ids = done_keys(paths.output, output_id_key)
        part, nparts = opts.partition, opts.total_partitions
        self.errors = ErrorRecords(paths, lambda line_no: error_in_partition(line_no, part, nparts))
        if self.done_ids or self.errors.done_lines:
            note(opts.quiet, f"resuming: {len(self.done_ids)} results and {len(self.errors.done_lines)} error records "
                             f"already written")
        self.results = JsonlAppender(paths.output)
        self.engine: LLMEngine | None = None
        self.loop: EngineLoop | None = None
        self.order: DatasetOrder | None = None  # None: input order
        self.total = self.done = len(self.done_ids)
        self.run_prompt = self.run_gen = self.run_max = 0
        self.structured_cut = 0  # constrained rows that hit max_tokens before their grammar completed
        self.remaining_prompt = self.remaining_max = 0
        self.t_engine = time.perf_counter()

    def snapshot(self) -> dict:
        e = self.engine
        elapsed = time.perf_counter() - self.t_engine
        p_rate = e.num_prompt_tokens_done / elapsed if e and elapsed > 0 else 0.0
        g_rate = e.num_generated_tokens / elapsed if e and elapsed > 0 else 0.0
        ratio = self.run_gen / self.run_max if self.run_max else 1.0
        rate = p_rate + g_rate
        work_left = self.remaining_prompt + self.remaining_max * ratio
        snap = {"state": "running", "output": str(self.opts.output), "total": self.total, "done": self.done,
                "failed": self.errors.count, "prompt_tok_s": p_rate, "gen_tok_s": g_rate,
                "prompt_tokens": e.num_prompt_tokens_done if e else 0, "gen_tokens": e.num_generated_tokens if e else 0,
                "elapsed_s": time.perf_counter() - self.t_start, "eta_s": work_left / rate if rate > 0 else None,
                "message": None}
        if e is not None and e.config.enable_prefix_caching:
            snap["prefix_cache_hit_rate"] = e.stats.prefix_cache_hit_rate
        if self.loop is not None:
            snap["deduplicated"] = self.loop.num_deduplicated
        return snap

    def postfix(self) -> str:
        s = self.snapshot()
        return (f"{s['prompt_tok_s']:.0f} prompt tok/s, {s['gen_tok_s']:.0f} gen tok/s, "
                f"ETA {format_duration(s['eta_s'])}")

    def closers(self) -> list:
        return [self.results, self.errors.appender]

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()  # a tensor-parallel engine's worker processes (a served job's rows still in flight)

    def validate(self):
        opts = self.opts
        signatures = PrefixSignatures()
        scanned = scan(self.source, self.ctx.pre, self.errors, signatures)
        self.errors.appender.sync()
        members = partition_members(scanned, opts.partition, opts.total_partitions)
        member_lines = np.flatnonzero(np.frombuffer(members, dtype=np.uint8))
        member_prompt = np.frombuffer(scanned.prompt_tokens, dtype=np.uint32)[member_lines]
        member_max = np.frombuffer(scanned.max_tokens, dtype=np.uint32)[member_lines]
        self.total = len(member_lines)
        self.remaining_prompt = int(member_prompt.sum(dtype=np.int64))
        self.remaining_max = int(member_max.sum(dtype=np.int64))
        if self.ctx.on_validated is not None:
            self.ctx.on_validated(self.total, self.errors.count)
        if self.done < self.total:
            self.order = self._order(signatures, member_lines, member_prompt)
            self.engine = self.ctx.engine or self._engine(self.ctx.plan(member_prompt, member_max))
            self.t_engine = time.perf_counter()
        return scanned, members

    def _order(self, signatures: PrefixSignatures, lines: np.ndarray, prompt: np.ndarray) -> DatasetOrder | None:
        """The dataset order when it pays (rows share prefixes the cache can reuse, or repeat), else None."""
        order = job_order(self.opts.dataset_order, signatures, lines, prompt, self.ctx.info.config.enable_prefix_caching,
                          self.opts.dedupe)
        if order is not None:
            note(self.opts.quiet, f"dataset order: rows grouped by shared prefix (about {order.shared_tokens:,} of "
                                  f"{self.remaining_prompt:,} prompt tokens shared, {order.duplicates:,} duplicate "
                                  f"rows)")
        return order

    def _engine(self, plan: MemoryPlan) -> LLMEngine:
        options = dict(self.opts.engine_options)
        options.setdefault("max_num_seqs", plan.recommended_max_num_seqs)
        options.setdefault("max_num_batched_tokens", plan.recommended_max_num_batched_tokens)
        self.state.write({**self.snapshot(), "message": "loading the model"}, force=True)
        try:
            engine = LLMEngine(EngineConfig.from_dict({"model": self.opts.model, **options}), self.ctx.grammars,
                               info=self.ctx.info)
        except ConfigError as e:
            raise JobSetupError(str(e)) from None
        note(self.opts.quiet, f"model {self.ctx.info.model_name} loaded in {engine.load_seconds:.1f} s; {self.total} "
                              f"requests in this partition, max_num_seqs={engine.config.max_num_seqs}, "
                              f"max_num_batched_tokens={engine.config.max_num_batched_tokens}")
        self.t_engine = time.perf_counter()
        return engine

    def work(self, validated) -> int:
        """Pass 2: feeds the engine through a bounded window and writes each result; returns a signal's exit code
        or 0 when every request of the partition is done."""
        scanned, members = validated
        engine = self.engine
        if engine is None:
            return 0

        def skip_done(line_no: int) -> None:  # a row finished by an earlier run: no work left in it
            self.remaining_prompt -= scanned.prompt_tokens[line_no]
            self.remaining_max -= scanned.max_tokens[line_no]

        todo = iter_job_rows(self.source, members, self.order, scanned.prompt_tokens, self.done_ids, self.ctx.pre,
                             on_skip=skip_done)
        loop = self.loop = EngineLoop(engine)
        # a dataset order is kept as it is; else each admission runs longest prompt first (the engine's setting)
        sort = self.order is None and engine.config.sort_by_length
        loop.open_feed("job", (item.submission() for item in todo), sort_by_length=sort, dedupe=self.opts.dedupe)
        progress = Progress(self.total, self.done, "tokenmill", "request", self.opts.quiet, self.opts.progress_interval)
        stop = self.stop
        try:
            for sub, out in loop.run(lambda: stop.received is not None, lambda: self.state.write_due(self.snapshot)):
                self._write(sub.payload, out)
                progress.update(1, self.postfix)
        finally:
            progress.close(self.postfix)
        if stop.received is None:
            return 0
        running = engine.num_running_requests
        dropped, followers = loop.close_feed("job")
        queued = max(0, dropped - running) + followers
        return self.stopped(f"stopped by signal after {self.done}/{self.total} requests; {running} running and "
                            f"{queued} queued requests will run on resume.")

    def _write(self, item: Prepared, out) -> None:
        self.results.write(output_record(item, out, self.ctx.info.model_name, self.engine.tokenizer, self.opts.score_tokens))
        self.done += 1
        self.run_prompt += out.num_prompt_tokens
        self.run_gen += out.num_generated_tokens if item.score_from is None else 0  # a score row's token is unused
        self.run_max += item.max_tokens
        if item.params.structured is not None and any(s.finish_reason == "length" for s in out.outputs):
            self.structured_cut += 1
        self.remaining_prompt -= out.num_prompt_tokens
        self.remaining_max -= item.max_tokens

    def complete(self, validated) -> None:
        """Results in input order (rewritten once, atomically), errors in line order, no empty errors file."""
        scanned, _ = validated
        self.results.close()
        self.state.write({**self.snapshot(), "message": "writing the results in input order"}, force=True)
        self.paths.output.touch()
        rewrite_in_order(self.paths.output, lambda r: scanned.line_of(output_id_key(r)) or 0)
        complete_outputs(self.paths, self.errors, self.source)

    def summary_lines(self, result: None) -> list[str]:
        opts, engine = self.opts, self.engine
        build = engine.kernel_build_seconds if engine else 0.0
        wall = time.perf_counter() - self.t_start - build  # a one-off kernel build is not the job's cost
        tok_s = (self.run_prompt + self.run_gen) / wall if wall > 0 else 0.0
        gen_s = self.run_gen / wall if wall > 0 else 0.0
        failed = self.errors.count
        lines = [
            f"tokenmill: completed {self.done}/{self.total} requests ok, {failed} failed, in "
            f"{format_duration(wall)} ({wall:.1f} s)",
            f"  this run: {self.run_prompt:,} input + {self.run_gen:,} output tokens, {tok_s:.1f} tok/s total, "
            f"{gen_s:.1f} output tok/s, {engine.stats.num_preemptions if engine else 0} preemptions",
        ]
        if engine is not None and engine.config.enable_prefix_caching:
            st = engine.stats
            lines.append(f"  prefix cache: {st.prefix_cache_hits:,} of {st.prefix_cache_queries:,} prompt tokens "
                         f"({100 * st.prefix_cache_hit_rate:.1f}%) came from the cache")
        if self.loop is not None and self.loop.num_deduplicated:
            lines.append(f"  deduplicated: {self.loop.num_deduplicated:,} rows repeated another row's prompt and "
                         f"sampling and were computed once")
        if self.structured_cut:
            lines.append(f"  structured outputs: {self.structured_cut:,} rows reached max_tokens before their schema "
                         f"or grammar was complete (finish_reason \"length\"; raise max_tokens)")
        if build:
            lines.append(f"  (not counted: a one-off {build:.1f} s build of the C++ kernels for this machine)")
        if opts.task == "score":  # what a score job buys is scored (input) tokens
            lines += summary_tail(opts, self.paths, failed, opts.num_gpus, tok_s, wall, "input")
        else:
            lines += summary_tail(opts, self.paths, failed, opts.num_gpus, gen_s, wall, "output")
        return lines
