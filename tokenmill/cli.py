"""The ``tokenmill`` command line: thin flags -> JobOptions / EngineConfig -> tokenmill.jobs.

Errors the user must fix (missing file, bad flag or config key, unknown model path) print one line on stderr and
exit with code 2; a fault part way through a job (disk full, output unwritable, input changed, engine error) one
line and exit code 3; no traceback. Exit codes are listed in ``EXIT_CODES_HELP`` and ``tokenmill --help``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tokenmill.config import ConfigError
from tokenmill.jobs.progress import SignalCatcher



class UserError(click.ClickException):
    exit_code = 2


EXIT_CODES_HELP = """\b
Exit codes of run / embed / validate / merge:
  0    every row done (validate: every line valid)
  1    finished, but some rows failed: see OUTPUT.errors.jsonl
  2    usage or set-up error (bad flag, missing input, refused resume); nothing ran
  3    stopped by a fault (disk full, output unwritable, input changed, engine error); rerun to resume
  130  SIGINT / 143 SIGTERM: stopped and flushed; rerun to resume"""

INPUT_HELP = ("INPUT: JSON Lines (.jsonl, optionally .gz / .zst / .bz2 / .xz compressed), CSV / TSV, Parquet, or - for "
              "stdin.")


def _engine_and_sampling(config: Path | None, model: str | None, engine_flags: dict, sampling_flags: dict):
    """Merges --config (if any) with flags; flags win. Returns (model, engine options, sampling defaults)."""
    from tokenmill.jobs.config_file import load_batch_config

    file_model, engine, sampling = (None, {}, {})
    if config is not None:
        file_model, engine, sampling = load_batch_config(config)
    engine.update({k: v for k, v in engine_flags.items() if v is not None})
    sampling.update({k: v for k, v in sampling_flags.items() if v is not None and v != ()})
    if "stop" in sampling and isinstance(sampling["stop"], (list, tuple)):
        sampling["stop"] = list(sampling["stop"])
    return model or file_model, engine, sampling


def _structured_flags(json_schema: Path | None, choices: str | None, regex: str | None,
                      grammar: Path | None) -> dict | None:
    """--json-schema FILE / --choices a,b,c / --regex R / --grammar FILE -> a job-wide ``structured`` default."""
    given = [(k, v) for k, v in (("json", json_schema), ("choice", choices), ("regex", regex), ("grammar", grammar))
             if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise UserError("give at most one of --json-schema, --choices, --regex and --grammar")
    kind, value = given[0]
    if kind in ("json", "grammar"):
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise UserError(f"cannot read {value}: {e.strerror}") from None
        if kind == "grammar":
            return {"grammar": text}
        try:
            schema = json.loads(text)
        except ValueError as e:
            raise UserError(f"--json-schema {value} is not valid JSON: {e}") from None
        if isinstance(schema, dict) and schema.get("type") == "json_schema" and "json_schema" in schema:
            schema = schema["json_schema"].get("schema", {})  # an OpenAI response_format object
        return {"json": schema}
    if kind == "choice":
        items = [c.strip() for c in value.split(",")]
        if not all(items):
            raise UserError(f"--choices expects labels separated by commas, got {value!r}")
        return {"choice": items}
    return {"regex": value}


def structured_options(f):
    for opt in reversed([
        click.option("--json-schema", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="Default output constraint: a JSON schema file (or an OpenAI response_format object). A "
                          "line's own response_format / structured_outputs wins."),
        click.option("--choices", default=None, metavar="A,B,C",
                     help="Default output constraint: one of these labels."),
        click.option("--regex", default=None, help="Default output constraint: a regular expression."),
        click.option("--grammar", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="Default output constraint: a context-free grammar file (GBNF, as llama.cpp's, or Lark)."),
    ]):
        f = opt(f)
    return f


def _job_context(model, engine, sampling):
    from tokenmill.jobs.runner import DEFAULT_MAX_TOKENS, JobContext

    return JobContext(model, engine, {"max_tokens": DEFAULT_MAX_TOKENS, **sampling})


def _columns(text, fields):
    from tokenmill.jobs.inputs import parse_columns

    return parse_columns(text, fields)


def _scan_input(input_path: str, input_format: str, columns, pre, on_error, fields):
    """Pass 1 over an input for `plan` / `validate` (stdin is spooled to a temporary file first)."""
    import tempfile

    from tokenmill.jobs.inputs import InputSource, InputSpec
    from tokenmill.jobs.scan import scan

    with tempfile.TemporaryDirectory(prefix="tokenmill-") as tmp:
        spec = InputSpec(input_path, input_format, columns)
        with InputSource(spec, fields, spool=Path(tmp) / "stdin") as source:
            return scan(source, pre, on_error)


def _run_job(kind: str, opts, ray_address, num_workers, shard_size, max_shard_retries) -> int:
    """A job on this machine, or over Ray with --ray; SIGINT / SIGTERM stop it between steps (handlers installed
    here, in the main thread, never inside the job library)."""
    if ray_address is None:
        if num_workers is not None or shard_size is not None:
            raise UserError("--num-workers and --shard-size need --ray")
        with SignalCatcher() as stop:
            if kind == "run":
                from tokenmill.jobs.runner import run_job

                return run_job(opts, stop)
            from tokenmill.embed.job import run_embed_job

            return run_embed_job(opts, stop)
    from tokenmill.distributed.driver import RayOptions, run_distributed

    ray_opts = RayOptions(ray_address, num_workers, shard_size, max_shard_retries)
    with SignalCatcher() as stop:
        return run_distributed(kind, opts, ray_opts, stop)


model_option = click.option("--model", "-m", default=None, help="HF model directory or .gguf file "
                            "(default: the embedded SmolLM2-135M-Instruct).")
config_option = click.option("--config", "config", type=click.Path(path_type=Path), default=None,
                             help="Batch config YAML (sections scheduler, memory, engine, sampling); flags override it.")
input_format_option = click.option("--input-format", type=click.Choice(["auto", "jsonl", "csv", "parquet"]),
                                   default="auto", show_default=True,
                                   help="auto: Parquet and compression by content, CSV/TSV by the .csv/.tsv name.")
columns_option = click.option("--columns", default=None, metavar="FIELD=COL,...",
                              help="CSV/Parquet: which column holds each field (default: columns named like the "
                                   "fields, e.g. id, prompt, messages, text, max_tokens).")


def ray_options(f):
    """--ray and its companions, for run and embed."""
    f = click.option("--max-shard-retries", type=int, default=3, show_default=True,
                     help="--ray: times a shard is re-run after its worker is lost; then its rows become "
                          "shard_failed error records (the same command retries them).")(f)
    f = click.option("--shard-size", type=int, default=None, metavar="ROWS",
                     help="--ray: rows per shard (default: ~8 shards per worker, at most 2M tokens each).")(f)
    f = click.option("--num-workers", type=int, default=None,
                     help="--ray: engines to start (default: one per node; one per GPU on a GPU cluster).")(f)
    f = click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                     help="Run the job over a Ray cluster: a Ray address, `auto` (this machine's cluster or "
                          "RAY_ADDRESS) or `local` (start one here). OUTPUT's directory must be shared by every "
                          "node.")(f)
    return f


quantization_option = click.option(
    "--quantization", type=click.Choice(["none", "w8a8", "int8", "int4"]), default=None,
    help="CPU: w8a8 = int8 GEMMs (fastest), int8 / int4 = weights only (least memory; a GGUF's Q8_0 / Q4 blocks "
         "load as they are). Default none. See `tokenmill eval` for what each costs in quality.")
kv_cache_dtype_option = click.option(
    "--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default=None,
    help="auto (default): the model's dtype; fp8: float8 e4m3, half of bfloat16's KV bytes (twice the tokens in "
         "--kv-cache-memory). See `tokenmill eval --kv-cache-dtype fp8` for what it costs in quality.")
progress_option = click.option("--progress-interval", type=float, default=None, metavar="SECONDS",
                               help="When stderr is not a terminal: seconds between plain progress lines (30).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="tokenmill")
def cli() -> None:
    """tokenmill: offline batch LLM inference. Datasets in, results out, resumable."""


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Results JSONL, in input order once the job completes (completion order while it runs). Beside "
                   "it: OUTPUT.errors.jsonl (only if a row failed), .manifest.json, .state.json, .lock while running.")
@model_option
@config_option
@click.option("--max-tokens", type=int, default=None, help="Default max output tokens per request (256).")
@click.option("--temperature", type=float, default=None, help="Default temperature (1.0; 0 = greedy).")
@click.option("--top-p", type=float, default=None, help="Default top-p (1.0).")
@click.option("--top-k", type=int, default=None, help="Default top-k (0 = off).")
@click.option("--seed", type=int, default=None, help="Default per-request sampling seed.")
@click.option("--stop", multiple=True, help="Default stop string (repeatable).")
@click.option("--max-num-seqs", type=int, default=None, help="Most running requests (default: from the memory plan).")
@click.option("--max-num-batched-tokens", type=int, default=None,
              help="Token budget of one step (default: from the memory plan).")
@click.option("--preemption-mode", type=click.Choice(["none", "recompute"]), default=None,
              help="none (default): never evict a running request; recompute: evict the newest and redo it later.")
@click.option("--scheduling-strategy", type=click.Choice(["continuous", "prefill_first"]), default=None,
              help="continuous (default) or prefill_first.")
@click.option("--sort-by-length/--no-sort-by-length", default=None, help="Admit longer prompts first within a window.")
@click.option("--prefix-caching/--no-prefix-caching", "prefix_caching", default=None,
              help="Share the KV cache of common prompt prefixes (default: on).")
@click.option("--dataset-order", type=click.Choice(["auto", "input"]), default="auto", show_default=True,
              help="auto: run rows that share a prompt prefix (or repeat) together when that pays, with prefix "
                   "caching; input: in input order. Results are written in input order either way.")
@click.option("--dedupe/--no-dedupe", default=True, show_default=True,
              help="Compute identical requests (same prompt and sampling, greedy or same seed) once (not with --ray).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None)
@quantization_option
@click.option("--max-model-len", type=int, default=None, help="Longest sequence (default: the model's).")
@click.option("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU (default 4).")
@kv_cache_dtype_option
@click.option("--gpu-memory-utilization", type=float, default=None, help="Fraction of GPU memory on CUDA (0.95).")
@click.option("--partition", type=int, default=0, show_default=True, help="This machine's partition index.")
@click.option("--total-partitions", type=int, default=1, show_default=True, help="Number of partitions.")
@click.option("--gpu-hourly-rate", type=float, default=None, help="USD per GPU-hour, for the cost summary.")
@click.option("--num-gpus", type=int, default=1, show_default=True, help="GPUs billed, for the cost summary.")
@click.option("--context-overflow", type=click.Choice(["error", "cap"]), default="error", show_default=True,
              help="A line whose own max_tokens does not fit after its prompt: an error record, or capped to the room "
                   "left. The job default (--max-tokens) is always capped.")
@structured_options
@input_format_option
@columns_option
@progress_option
@ray_options
@click.option("--overwrite", is_flag=True, help="Discard earlier results for OUTPUT and start afresh.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def run(input_path, output, model, config, max_tokens, temperature, top_p, top_k, seed, stop, max_num_seqs,
        max_num_batched_tokens, preemption_mode, scheduling_strategy, sort_by_length, prefix_caching, dataset_order,
        dedupe, dtype, quantization, max_model_len, kv_cache_memory, kv_cache_dtype, gpu_memory_utilization, partition,
        total_partitions, gpu_hourly_rate, num_gpus,
        context_overflow, json_schema, choices, regex, grammar, input_format, columns, progress_interval, ray_address,
        num_workers, shard_size, max_shard_retries, overwrite, quiet):
    """Run a dataset through the model into OUTPUT; the same command resumes an interrupted job.

    Rows: {"id", "prompt"} or {"id", "messages"} (optional max_tokens, temperature, top_p, seed, stop), or OpenAI
    Batch lines for /v1/chat/completions and /v1/completions. Bad rows go to OUTPUT.errors.jsonl and the job goes on.
    INPUT: JSON Lines (.jsonl, optionally .gz / .zst / .bz2 / .xz), CSV / TSV, Parquet, or - for stdin.
    """
    from tokenmill.jobs.inputs import RUN_FIELDS
    from tokenmill.jobs.runner import JobOptions

    model, engine, sampling = _engine_and_sampling(
        config, model,
        dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, preemption_mode=preemption_mode,
             scheduling_strategy=scheduling_strategy, sort_by_length=sort_by_length,
             enable_prefix_caching=prefix_caching, dtype=dtype, quantization=quantization,
             max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
             gpu_memory_utilization=gpu_memory_utilization),
        dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
             structured=_structured_flags(json_schema, choices, regex, grammar)),
    )
    opts = JobOptions(input=input_path, output=output, model=model, engine_options=engine, sampling_defaults=sampling,
                      partition=partition, total_partitions=total_partitions, gpu_hourly_rate=gpu_hourly_rate,
                      num_gpus=num_gpus, quiet=quiet, overwrite=overwrite, input_format=input_format,
                      columns=_columns(columns, RUN_FIELDS), context_overflow=context_overflow,
                      progress_interval=progress_interval, dataset_order=dataset_order, dedupe=dedupe)
    return _run_job("run", opts, ray_address, num_workers, shard_size, max_shard_retries)


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw state as JSON.")
def status(output, as_json):
    """State of the job writing OUTPUT: running / completed / interrupted / failed, progress, rates, ETA."""
    from tokenmill.jobs.files import JobPaths
    from tokenmill.jobs.state import format_status, read_status

    path = JobPaths(output).state
    if not path.exists():
        raise UserError(f"no job state for {output} (expected {path})")
    try:
        data = read_status(path)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the job state file {path} is damaged ({type(e).__name__}); the job rewrites it when it "
                        f"runs again") from None
    click.echo(json.dumps(data, indent=1) if as_json else format_status(data))
    return 0


@cli.command()
@click.argument("input_path", metavar="INPUT")
@model_option
@config_option
@click.option("--max-tokens", type=int, default=None, help="Default max output tokens per request (256).")
@click.option("--max-model-len", type=int, default=None)
@click.option("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU.")
@kv_cache_dtype_option
@click.option("--gpu-memory-utilization", type=float, default=None)
@input_format_option
@columns_option
@click.option("--deadline", default=None, metavar="DURATION",
              help="Fleet plan: finish the dataset within this time (e.g. 12h, 90m) on a --ray cluster.")
@click.option("--gpu-hourly-rate", type=float, default=None, help="Fleet plan: USD per worker-hour.")
@click.option("--spot-discount", type=float, default=0.6, show_default=True,
              help="Fleet plan: spot price = on-demand x (1 - discount).")
@click.option("--tok-per-s", type=float, default=None,
              help="Fleet plan: one worker's speed in prompt + output tokens/s.")
@click.option("--calibrate", is_flag=True,
              help="Fleet plan: measure one worker's tok/s (and the share of max_tokens generated) on a sample of "
                   "the dataset here.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(input_path, model, config, max_tokens, max_model_len, kv_cache_memory, kv_cache_dtype, gpu_memory_utilization,
         input_format, columns, deadline, gpu_hourly_rate, spot_discount, tok_per_s, calibrate, as_json):
    """Memory plan from the dataset's length statistics: KV blocks, concurrency, recommended settings. With
    --deadline: the fleet plan (workers, shard size, cost on demand and on spot) for a `run --ray` job."""
    import tempfile

    from tokenmill.jobs.inputs import RUN_FIELDS, InputSource, InputSpec
    from tokenmill.jobs.scan import scan

    fleet_args = dict(gpu_hourly_rate=gpu_hourly_rate, tok_per_s=tok_per_s, calibrate=calibrate or None)
    deadline_s = None
    if deadline is None:
        given = [k.replace("_", "-") for k, v in fleet_args.items() if v is not None]
        if given:
            raise UserError(f"--{', --'.join(given)}: only with --deadline (the fleet plan)")
    else:
        from tokenmill.distributed.fleet import parse_duration

        try:
            deadline_s = parse_duration(deadline)
        except ValueError as e:
            raise UserError(f"--deadline: {e}") from None
        if gpu_hourly_rate is None or gpu_hourly_rate < 0:
            raise UserError("--deadline needs --gpu-hourly-rate USD (>= 0)")
        if (tok_per_s is None) == (not calibrate):
            raise UserError("--deadline needs one of --tok-per-s N or --calibrate")
    model, engine, sampling = _engine_and_sampling(
        config, model, dict(max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                            gpu_memory_utilization=gpu_memory_utilization), dict(max_tokens=max_tokens))
    ctx = _job_context(model, engine, sampling)
    with tempfile.TemporaryDirectory(prefix="tokenmill-") as tmp:
        spec = InputSpec(input_path, input_format, _columns(columns, RUN_FIELDS))
        with InputSource(spec, RUN_FIELDS, spool=Path(tmp) / "stdin") as source:
            s = scan(source, ctx.pre, lambda n, e: None)
            p = ctx.plan(*s.valid_lengths())
            fleet = None
            if deadline_s is not None:
                from tokenmill.distributed.fleet import calibrate as measure
                from tokenmill.distributed.fleet import plan_fleet

                ratio = 1.0
                if calibrate:
                    try:
                        tok_per_s, ratio = measure(ctx, engine, s, source)
                    except ValueError as e:
                        raise UserError(str(e)) from None
                try:
                    fleet = plan_fleet(*s.valid_lengths(), tok_per_s, deadline_s, gpu_hourly_rate, spot_discount,
                                       ratio, calibrated=bool(calibrate))
                except ValueError as e:
                    raise UserError(str(e)) from None
    if as_json:
        click.echo(json.dumps({**p.as_dict(), **({"fleet": fleet.as_dict()} if fleet else {})}, indent=1))
    else:
        click.echo(p.render())
        if fleet:
            click.echo(fleet.render())
    if s.num_errors:
        click.echo(f"({s.num_errors} invalid lines left out; see `tokenmill validate`)", err=True)
    return 0


@cli.command("eval")
@model_option
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None)
@quantization_option
@kv_cache_dtype_option
@click.option("--text", "text_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Text file for perplexity (default: a ~1,000-word text shipped with tokenmill).")
@click.option("--context", type=int, default=512, show_default=True, help="Tokens per perplexity window.")
@click.option("--limit-tokens", type=int, default=None, help="Score at most this many tokens of the text.")
@click.option("--prompts", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Prompts for greedy agreement with float32: one per line, or JSONL with prompt (default: 8 "
                   "built in).")
@click.option("--max-tokens", type=int, default=32, show_default=True, help="Greedy output tokens per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model, dtype, quantization, kv_cache_dtype, text_path, context, limit_tokens, prompts, max_tokens,
             as_json):
    """What a setting costs in quality: perplexity on a text and, for a setting other than float32 unquantized, the
    float32 perplexity and greedy agreement with float32 (run it before a large job in another dtype or
    quantization)."""
    from tokenmill.eval import render, run_eval

    if context < 2 or max_tokens < 1 or (limit_tokens is not None and limit_tokens < 2):
        raise UserError("--context and --limit-tokens must be at least 2, --max-tokens at least 1")
    try:
        options = {k: v for k, v in (("dtype", dtype), ("quantization", quantization),
                                     ("kv_cache_dtype", kv_cache_dtype)) if v}
        result = run_eval(model, options, text_path, context, limit_tokens, prompts, max_tokens)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(str(e)) from None
    click.echo(json.dumps(result, indent=1) if as_json else render(result))
    return 0


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT")
@model_option
@click.option("--max-model-len", type=int, default=None)
@click.option("--context-overflow", type=click.Choice(["error", "cap"]), default="error", show_default=True,
              help="As for `run`: a line's own max_tokens that does not fit is an error, or capped.")
@input_format_option
@columns_option
def validate(input_path, model, max_model_len, context_overflow, input_format, columns):
    """Only the validation pass: exit 0 if every line is valid, else 1 with the error records on stdout."""
    from tokenmill.jobs.inputs import RUN_FIELDS
    from tokenmill.jobs.runner import DEFAULT_MAX_TOKENS, JobContext

    ctx = JobContext(model, {"max_model_len": max_model_len} if max_model_len else {},
                     {"max_tokens": DEFAULT_MAX_TOKENS}, context_overflow)
    s = _scan_input(input_path, input_format, _columns(columns, RUN_FIELDS), ctx.pre,
                    lambda n, e: click.echo(json.dumps(e.to_record(n), ensure_ascii=False)), RUN_FIELDS)
    click.echo(f"{s.num_valid} valid, {s.num_errors} invalid lines in {input_path}", err=True)
    return 1 if s.num_errors else 0


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("parts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Merged results JSONL.")
@click.option("--input", "input_path", type=click.Path(path_type=Path), default=None,
              help="The original input: order the merge by it and check every id is present exactly once.")
def merge(parts, output, input_path):
    """Merge partition outputs (and their .errors.jsonl) into one file, in input order when --input is given."""
    from tokenmill.jobs.merge import merge_parts

    problems = merge_parts(list(parts), output, input_path)
    for p in problems[:20]:
        click.echo(f"tokenmill: {p}", err=True)
    if problems:
        click.echo(f"tokenmill: merge found {len(problems)} problem(s)", err=True)
        return 1
    return 0


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="VECTORS.parquet (or a .jsonl with --format openai, in input order once complete). Beside it: "
                   ".errors.jsonl (only if a row failed), .manifest.json, .state.json, and .lock and .parts/ while the "
                   "job runs.")
@click.option("--model", "-m", default=None,
              help="HF encoder directory (BERT family) or Llama-family decoder (HF directory or .gguf) "
                   "(default: the embedded all-MiniLM-L6-v2).")
@click.option("--normalize/--no-normalize", default=None,
              help="L2-normalise the vectors (default: as the model's sentence-transformers config says).")
@click.option("--pooling", type=click.Choice(["mean", "cls", "last", "max", "mean_sqrt_len"]), default=None,
              help="Pooling (default: the model's sentence-transformers config; mean for encoders, last for decoders).")
@click.option("--max-batch-tokens", type=int, default=None, help="Tokens per packed forward pass (2048).")
@click.option("--max-seq-length", type=int, default=None,
              help="Truncate longer texts to this many tokens (default: the model's max_seq_length).")
@click.option("--format", "fmt", type=click.Choice(["parquet", "openai"]), default="parquet", show_default=True,
              help="parquet: columns id, embedding; openai: OpenAI Batch output lines with embedding objects.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="auto: float32 on CPU (the parity dtype), bfloat16 on CUDA. bfloat16 is ~1.7x "
              "faster on CPUs with AVX512-BF16/AMX; float16 is CUDA only.")
@quantization_option
@click.option("--gpu-hourly-rate", type=float, default=None, help="USD per GPU-hour, for the cost summary.")
@click.option("--num-gpus", type=int, default=1, show_default=True, help="GPUs billed, for the cost summary.")
@input_format_option
@columns_option
@progress_option
@ray_options
@click.option("--overwrite", is_flag=True, help="Discard earlier results for OUTPUT and start afresh.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary.")
def embed(input_path, output, model, normalize, pooling, max_batch_tokens, max_seq_length, fmt, dtype, quantization,
          gpu_hourly_rate, num_gpus, input_format, columns, progress_interval, ray_address, num_workers, shard_size,
          max_shard_retries, overwrite, quiet):
    """Embed a corpus into OUTPUT; the same command resumes an interrupted job.

    Rows: {"id", "text"} or OpenAI Batch lines for /v1/embeddings (one input each). Bad rows go to
    OUTPUT.errors.jsonl. Texts longer than the model's limit are truncated as sentence-transformers does.
    INPUT: JSON Lines (.jsonl, optionally .gz / .zst / .bz2 / .xz), CSV / TSV, Parquet, or - for stdin.
    """
    from tokenmill.embed.embedder import DEFAULT_MAX_BATCH_TOKENS
    from tokenmill.embed.job import EmbedOptions
    from tokenmill.jobs.inputs import EMBED_FIELDS

    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise UserError(f"--max-batch-tokens must be >= 1, got {max_batch_tokens}")
    if max_seq_length is not None and max_seq_length < 2:
        raise UserError(f"--max-seq-length must be >= 2, got {max_seq_length}")
    opts = EmbedOptions(input=input_path, output=output, model=model, normalize=normalize, pooling=pooling,
                        max_batch_tokens=max_batch_tokens or DEFAULT_MAX_BATCH_TOKENS, max_seq_length=max_seq_length,
                        dtype=dtype, quantization=quantization or "none", format=fmt,
                        gpu_hourly_rate=gpu_hourly_rate, num_gpus=num_gpus, quiet=quiet,
                        overwrite=overwrite, input_format=input_format, columns=_columns(columns, EMBED_FIELDS),
                        progress_interval=progress_interval)
    return _run_job("embed", opts, ray_address, num_workers, shard_size, max_shard_retries)


@cli.command()
@click.argument("vectors", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True, help="Index directory.")
@click.option("--kind", type=click.Choice(["flat", "hnsw", "ivf"]), default="hnsw", show_default=True,
              help="flat: exact; hnsw: graph (M=32); ivf: inverted lists (~4 sqrt(n) centroids, nprobe 16).")
@click.option("--queries", type=click.Path(path_type=Path), default=None,
              help="Held-out query vectors (a `tokenmill embed` output) for the recall@10 measurement.")
def index(vectors, out_dir, kind, queries):
    """Build an ANN index (faiss) over a vectors file from `tokenmill embed`; report build time and recall@10."""
    from tokenmill.embed.index import build_index

    for p in (vectors, queries):
        if p is not None and not p.is_file():
            raise UserError(f"vectors file {p} does not exist")
    try:
        report = build_index(vectors, out_dir, kind, queries)
    except ValueError as e:
        raise UserError(str(e)) from None
    click.echo(report.render(), err=True)
    return 0


@cli.command()
@click.argument("index_dir", type=click.Path(path_type=Path))
@click.argument("query")
@click.option("-k", type=int, default=10, show_default=True, help="How many neighbours to print.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit.")
def search(index_dir, query, k, as_json):
    """Embed QUERY with the index's model and print the k nearest ids with their scores."""
    from tokenmill.embed.embedder import Embedder
    from tokenmill.embed.index import VectorIndex

    if not (index_dir / "meta.json").is_file():
        raise UserError(f"{index_dir} is not a tokenmill index directory (no meta.json)")
    if k < 1:
        raise UserError(f"-k must be >= 1, got {k}")
    if not query.strip():
        raise UserError("the query is empty")
    idx = VectorIndex(index_dir)
    m = idx.meta
    emb = Embedder(m["model"], pooling=m["pooling"], normalize=m["normalize"], max_seq_length=m["max_seq_length"])
    for rank, (rid, score) in enumerate(idx.search(emb.encode([query]), k)[0], 1):
        click.echo(json.dumps({"rank": rank, "id": rid, "score": score}) if as_json else f"{rank}\t{score:.4f}\t{rid}")
    return 0


@cli.command()
@model_option
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require `Authorization: Bearer KEY` on /v1/* requests.")
@click.option("--served-model-name", default=None, help="The model name clients use (default: the model file's).")
@click.option("--max-num-seqs", type=int, default=None, help="Most requests batched at once (256).")
@click.option("--max-num-batched-tokens", type=int, default=None, help="Token budget of one step (2048).")
@click.option("--max-wait-ms", type=float, default=0.0, show_default=True,
              help="While fewer than max-num-seqs run and requests keep arriving, wait this long after the latest "
                   "arrival before a step, to batch more.")
@click.option("--max-queued-requests", type=int, default=1024, show_default=True,
              help="Waiting requests beyond the running batch; past it, HTTP 429 with Retry-After.")
@click.option("--shutdown-timeout", type=float, default=30.0, show_default=True,
              help="On SIGTERM: seconds in-flight requests get to finish before they are aborted.")
@click.option("--preemption-mode", type=click.Choice(["none", "recompute"]), default=None)
@click.option("--prefix-caching/--no-prefix-caching", "prefix_caching", default=None,
              help="Share the KV cache of common prompt prefixes (default: on).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None)
@quantization_option
@click.option("--max-model-len", type=int, default=None, help="Longest sequence (default: the model's).")
@click.option("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU (default 4).")
@kv_cache_dtype_option
@click.option("--embedding-model", default=None,
              help="Also serve POST /v1/embeddings with this encoder directory (or `default`: all-MiniLM-L6-v2).")
def serve(model, config, host, port, api_key, served_model_name, max_num_seqs, max_num_batched_tokens, max_wait_ms,
          max_queued_requests, shutdown_timeout, preemption_mode, prefix_caching, dtype, quantization, max_model_len,
          kv_cache_memory, kv_cache_dtype, embedding_model):
    """An OpenAI-compatible HTTP server on the same engine: /v1/chat/completions, /v1/completions (streaming or
    not), /v1/embeddings, /v1/models, /health, /metrics."""
    from tokenmill.serve.app import ServeSettings
    from tokenmill.serve.app import serve as run_server

    if max_queued_requests < 1:
        raise UserError(f"--max-queued-requests must be >= 1, got {max_queued_requests}")
    if max_wait_ms < 0 or shutdown_timeout < 0:
        raise UserError("--max-wait-ms and --shutdown-timeout must be >= 0")
    model, engine, _ = _engine_and_sampling(
        config, model, dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            preemption_mode=preemption_mode, enable_prefix_caching=prefix_caching, dtype=dtype,
                            quantization=quantization, max_model_len=max_model_len,
                            kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype), {})
    from tokenmill.config import EngineConfig
    from tokenmill.model.loader import resolve_model_path

    EngineConfig.from_dict({"model": model, **engine})  # a bad option: one line, exit 2, before binding the port
    resolve_model_path(model)
    settings = ServeSettings(engine_options={"model": model, **engine}, served_model_name=served_model_name,
                             api_key=api_key, max_wait_ms=max_wait_ms, max_queued_requests=max_queued_requests,
                             embedding_model=embedding_model)
    return run_server(settings, host, port, shutdown_timeout)


@cli.command("build-kernels")
def build_kernels():
    """Build the C++ CPU kernels now (once per machine; for images and CI), so no job pays for it."""
    from tokenmill.kernels.cpu_kernel import load_kernels

    k = load_kernels()
    if k.module is None:
        raise UserError(f"the C++ CPU kernels could not be built: {k.error}")
    how = f"built in {k.build_seconds:.1f} s" if k.build_seconds else "already built"
    click.echo(f"tokenmill: C++ CPU kernels ready ({how}): {k.path}", err=True)
    return 0


def main(argv: list[str] | None = None) -> None:
    from tokenmill.jobs.errors import EXIT_FAULT, EXIT_USAGE, JobFault, JobSetupError
    from tokenmill.model.loader import ModelNotFoundError

    try:
        code = cli.main(args=argv, prog_name="tokenmill", standalone_mode=False)
    except click.exceptions.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"tokenmill: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("tokenmill: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        print(f"tokenmill: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (JobSetupError, ConfigError, ModelNotFoundError, FileNotFoundError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except JobFault as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAULT)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
