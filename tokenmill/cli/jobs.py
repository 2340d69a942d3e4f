"""``tokenmill run``, ``status``, ``plan``, ``validate`` and ``merge``: the generation job and its tools."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tokenmill.cli.common import (EXIT_CODES_HELP, UserError, columns_of, columns_option, config_option,
                                  engine_and_sampling, input_format_option, job_context, job_options,
                                  kv_cache_dtype_option, lora_engine_options, lora_options, model_memory_options,
                                  model_option, preemption_options,
                                  run_job, scan_input, structured_flags, structured_options)


@click.command(epilog=EXIT_CODES_HELP)
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
@preemption_options
@lora_options
@click.option("--scheduling-strategy", type=click.Choice(["continuous", "prefill_first"]), default=None,
              help="continuous (default) or prefill_first.")
@click.option("--sort-by-length/--no-sort-by-length", default=None, help="Admit longer prompts first within a window.")
@click.option("--prefix-caching/--no-prefix-caching", "prefix_caching", default=None,
              help="Share the KV cache of common prompt prefixes (default: on).")
@click.option("--dataset-order", type=click.Choice(["auto", "input"]), default="auto", show_default=True,
              help="auto: run rows that share a prompt prefix (or repeat) together when that pays, with prefix "
                   "caching; input: in input order. Results are written in input order either way.")
@click.option("--task", type=click.Choice(["generate", "score"]), default="generate", show_default=True,
              help="score: each row's prompt (or its `continuation` after the prompt) is scored by the model: the "
                   "log-probability sum and mean, perplexity and is_greedy per row; nothing is generated.")
@click.option("--score-tokens", is_flag=True, help="--task score: each scored token's logprob in the record too.")
@click.option("--dedupe/--no-dedupe", default=True, show_default=True,
              help="Compute identical requests (same prompt and sampling, greedy or same seed) once (not with --ray).")
@model_memory_options
@click.option("--gpu-memory-utilization", type=float, default=None, help="Fraction of GPU memory on CUDA (0.95).")
@click.option("--partition", type=int, default=0, show_default=True, help="This machine's partition index.")
@click.option("--total-partitions", type=int, default=1, show_default=True, help="Number of partitions.")
@click.option("--context-overflow", type=click.Choice(["error", "cap"]), default="error", show_default=True,
              help="A line whose own max_tokens does not fit after its prompt: an error record, or capped to the room "
                   "left. The job default (--max-tokens) is always capped.")
@structured_options
@job_options
def run(input_path, output, model, config, max_tokens, temperature, top_p, top_k, seed, stop, max_num_seqs,
        max_num_batched_tokens, preemption_mode, swap_space, lora, max_loras, scheduling_strategy, sort_by_length,
        prefix_caching,
        dataset_order, task, score_tokens, dedupe, device, dtype, quantization, max_model_len, kv_cache_memory, kv_cache_dtype, attention_backend,
        enforce_eager, tensor_parallel_size, gpu_memory_utilization, partition,
        total_partitions, gpu_hourly_rate, num_gpus,
        context_overflow, json_schema, choices, regex, grammar, input_format, columns, progress_interval, ray_address,
        num_workers, shard_size, max_shard_retries, overwrite, quiet):
    """Run a dataset through the model into OUTPUT; the same command resumes an interrupted job.

    Rows: {"id", "prompt"} or {"id", "messages"} (optional max_tokens, temperature, top_p, seed, stop, lora), or OpenAI
    Batch lines for /v1/chat/completions and /v1/completions. Bad rows go to OUTPUT.errors.jsonl and the job goes on.
    INPUT: JSON Lines (.jsonl, optionally .gz / .zst / .bz2 / .xz), CSV / TSV, Parquet, or - for stdin.
    """
    from tokenmill.jobs.inputs import RUN_FIELDS
    from tokenmill.jobs.runner import JobOptions

    model, engine, sampling = engine_and_sampling(
        config, model,
        dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, preemption_mode=preemption_mode,
             swap_space=swap_space, scheduling_strategy=scheduling_strategy, sort_by_length=sort_by_length,
             enable_prefix_caching=prefix_caching, device=device, dtype=dtype, quantization=quantization,
             max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
             attention_backend=attention_backend, enforce_eager=enforce_eager or None,
             tensor_parallel_size=tensor_parallel_size,
             gpu_memory_utilization=gpu_memory_utilization, **lora_engine_options(lora, max_loras)),
        dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
             structured=structured_flags(json_schema, choices, regex, grammar)),
    )
    opts = JobOptions(input=input_path, output=output, model=model, engine_options=engine, sampling_defaults=sampling,
                      partition=partition, total_partitions=total_partitions, gpu_hourly_rate=gpu_hourly_rate,
                      num_gpus=num_gpus, quiet=quiet, overwrite=overwrite, input_format=input_format,
                      columns=columns_of(columns, RUN_FIELDS), context_overflow=context_overflow,
                      progress_interval=progress_interval, dataset_order=dataset_order, dedupe=dedupe, task=task,
                      score_tokens=score_tokens)
    if score_tokens and task != "score":
        raise UserError("--score-tokens needs --task score")
    return run_job("run", opts, ray_address, num_workers, shard_size, max_shard_retries)


@click.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw state as JSON.")
@click.option("--web", is_flag=True, help="Serve a live page of the job (progress, tokens/s over time, ETA, cost) "
                                          "until Ctrl-C, instead of printing once.")
@click.option("--host", default="127.0.0.1", show_default=True, help="--web: the address to bind.")
@click.option("--port", type=int, default=8080, show_default=True, help="--web: the port.")
@click.option("--gpu-hourly-rate", type=float, default=None, help="--web: USD per GPU-hour, for the page's cost.")
@click.option("--num-gpus", type=int, default=1, show_default=True, help="--web: GPUs the job runs on (cost).")
def status(output, as_json, web, host, port, gpu_hourly_rate, num_gpus):
    """State of the job writing OUTPUT: running / completed / interrupted / failed, progress, rates, ETA.
    With --web, the same as a live page on http://HOST:PORT/."""
    from tokenmill.jobs.files import JobPaths
    from tokenmill.jobs.state import format_status, read_status

    path = JobPaths(output).state
    if not path.exists():
        raise UserError(f"no job state for {output} (expected {path})")
    if web:
        if gpu_hourly_rate is not None and gpu_hourly_rate < 0:
            raise UserError(f"--gpu-hourly-rate must be >= 0, got {gpu_hourly_rate}")
        import socket

        from tokenmill.serve.page import serve_status

        try:
            with socket.create_server((host, port)):
                pass
        except OSError as e:
            raise UserError(f"--web cannot listen on {host}:{port}: {e.strerror or e}") from None
        return serve_status(output, host, port, gpu_hourly_rate, num_gpus)
    try:
        data = read_status(path)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"the job state file {path} is damaged ({type(e).__name__}); the job rewrites it when it "
                        f"runs again") from None
    click.echo(json.dumps(data, indent=1) if as_json else format_status(data))
    return 0


@click.command()
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
@lora_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(input_path, model, config, max_tokens, max_model_len, kv_cache_memory, kv_cache_dtype, gpu_memory_utilization,
         input_format, columns, deadline, gpu_hourly_rate, spot_discount, tok_per_s, calibrate, lora, max_loras,
         as_json):
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
    model, engine, sampling = engine_and_sampling(
        config, model, dict(max_model_len=max_model_len, kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                            gpu_memory_utilization=gpu_memory_utilization, **lora_engine_options(lora, max_loras)),
        dict(max_tokens=max_tokens))
    ctx = job_context(model, engine, sampling)
    with tempfile.TemporaryDirectory(prefix="tokenmill-") as tmp:
        spec = InputSpec(input_path, input_format, columns_of(columns, RUN_FIELDS))
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


@click.command(epilog=EXIT_CODES_HELP)
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
    s = scan_input(input_path, input_format, columns_of(columns, RUN_FIELDS), ctx.pre,
                    lambda n, e: click.echo(json.dumps(e.to_record(n), ensure_ascii=False)), RUN_FIELDS)
    click.echo(f"{s.num_valid} valid, {s.num_errors} invalid lines in {input_path}", err=True)
    return 1 if s.num_errors else 0


@click.command(epilog=EXIT_CODES_HELP)
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
