"""What the ``tokenmill`` commands share: the user-error exception, the options several commands take, and the
helpers that turn flags into job options."""

from __future__ import annotations

import json
from pathlib import Path

import click

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


def engine_and_sampling(config: Path | None, model: str | None, engine_flags: dict, sampling_flags: dict):
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


def structured_flags(json_schema: Path | None, choices: str | None, regex: str | None,
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


def job_context(model, engine, sampling):
    from tokenmill.jobs.runner import DEFAULT_MAX_TOKENS, JobContext

    return JobContext(model, engine, {"max_tokens": DEFAULT_MAX_TOKENS, **sampling})


def columns_of(text, fields):
    from tokenmill.jobs.inputs import parse_columns

    return parse_columns(text, fields)


def scan_input(input_path: str, input_format: str, columns, pre, on_error, fields):
    """Pass 1 over an input for `plan` / `validate` (stdin is spooled to a temporary file first)."""
    import tempfile

    from tokenmill.jobs.inputs import InputSource, InputSpec
    from tokenmill.jobs.scan import scan

    with tempfile.TemporaryDirectory(prefix="tokenmill-") as tmp:
        spec = InputSpec(input_path, input_format, columns)
        with InputSource(spec, fields, spool=Path(tmp) / "stdin") as source:
            return scan(source, pre, on_error)


def run_job(kind: str, opts, ray_address, num_workers, shard_size, max_shard_retries) -> int:
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


def lora_options(f):
    """--lora NAME=PATH (repeatable) and --max-loras, for run and serve."""
    for opt in reversed([
        click.option("--lora", "lora", multiple=True, metavar="NAME=PATH",
                     help="Load a PEFT LoRA adapter directory under NAME (repeatable). A row picks it with "
                          "\"lora\": NAME (an OpenAI line or request with \"model\": NAME); rows of different "
                          "adapters and of the base model batch together."),
        click.option("--max-loras", type=int, default=None, help="Most adapters loaded at once (default 8)."),
    ]):
        f = opt(f)
    return f


def lora_engine_options(lora: tuple[str, ...], max_loras: int | None) -> dict:
    """The engine options of --lora / --max-loras (EngineConfig parses and checks the NAME=PATH strings: a malformed
    or repeated one is one line, exit 2)."""
    return {"lora_adapters": list(lora) or None, "max_loras": max_loras}


def preemption_options(f):
    """--preemption-mode and --swap-space, for run and serve."""
    for opt in reversed([
        click.option("--preemption-mode", type=click.Choice(["none", "recompute", "swap"]), default=None,
                     help="none (default): a request is admitted only with blocks for all it can use, never "
                          "evicted; recompute: blocks as needed, the newest request evicted and redone when they "
                          "run out; swap: the same, its K/V kept in --swap-space host memory and copied back."),
        click.option("--swap-space", type=float, default=None,
                     help="GiB of host memory (pinned on CUDA) for swapped-out K/V with --preemption-mode swap "
                          "(default 4)."),
    ]):
        f = opt(f)
    return f


def model_memory_options(f):
    """--device, --dtype, --quantization, --max-model-len, --kv-cache-memory, --kv-cache-dtype,
    --attention-backend, --enforce-eager and --tensor-parallel-size, for run and serve."""
    for opt in reversed([
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
                     help="auto (default): CUDA when present, else CPU."),
        click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None),
        quantization_option,
        click.option("--max-model-len", type=int, default=None, help="Longest sequence (default: the model's)."),
        click.option("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU (default 4)."),
        kv_cache_dtype_option,
        click.option("--attention-backend", default=None,
                     type=click.Choice(["auto", "reference", "torch", "cpu_kernel", "triton"]),
                     help="auto (default): the C++ kernels on CPU, Triton on CUDA (after a self-check). triton on a "
                          "CPU runs only under TRITON_INTERPRET=1 (slow: for checking, not for jobs)."),
        click.option("--enforce-eager", is_flag=True, default=None,
                     help="CUDA: no CUDA graphs for decode steps (they are captured at start-up by default)."),
        click.option("--tensor-parallel-size", type=int, default=None,
                     help="Split the model over N ranks (processes): N GPUs on CUDA, gloo on CPU. Default 1."),
    ]):
        f = opt(f)
    return f


def job_options(f):
    """The options of a job command (run, embed): the cost summary's rate, the input's format and columns, progress,
    --ray, --overwrite and --quiet."""
    for opt in reversed([
        click.option("--gpu-hourly-rate", type=float, default=None, help="USD per GPU-hour, for the cost summary."),
        click.option("--num-gpus", type=int, default=1, show_default=True, help="GPUs billed, for the cost summary."),
        input_format_option, columns_option, progress_option, ray_options,
        click.option("--overwrite", is_flag=True, help="Discard earlier results for OUTPUT and start afresh."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or summary."),
    ]):
        f = opt(f)
    return f


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
    "--quantization", type=click.Choice(["none", "w8a8", "int8", "int4", "fp8"]), default=None,
    help="CPU: w8a8 = int8 GEMMs (fastest), int8 / int4 = weights only (least memory; a GGUF's Q8_0 / Q4 blocks "
         "load as they are). GPU: fp8 = float8 weights and activations (Hopper's fp8 GEMMs; also runs, slowly, on "
         "a CPU). Default none. See `tokenmill eval` for what each costs in quality.")
kv_cache_dtype_option = click.option(
    "--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default=None,
    help="auto (default): the model's dtype; fp8: float8 e4m3, half of bfloat16's KV bytes (twice the tokens in "
         "--kv-cache-memory). See `tokenmill eval --kv-cache-dtype fp8` for what it costs in quality.")
progress_option = click.option("--progress-interval", type=float, default=None, metavar="SECONDS",
                               help="When stderr is not a terminal: seconds between plain progress lines (30).")
