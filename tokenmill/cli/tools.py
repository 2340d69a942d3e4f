"""``tokenmill eval``, ``serve`` and ``build-kernels``: what a setting costs in quality, the online server, the C++
kernels built ahead of time."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tokenmill.cli.common import (UserError, config_option, engine_and_sampling, kv_cache_dtype_option,
                                  lora_engine_options, lora_options, model_memory_options, model_option,
                                  preemption_options, quantization_option)


@click.command("eval")
@model_option
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default=None)
@quantization_option
@kv_cache_dtype_option
@click.option("--text", "text_path", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Text file for perplexity (default: a ~3,300-word text shipped with tokenmill).")
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


@click.command()
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
@preemption_options
@lora_options
@click.option("--prefix-caching/--no-prefix-caching", "prefix_caching", default=None,
              help="Share the KV cache of common prompt prefixes (default: on).")
@model_memory_options
@click.option("--gpu-memory-utilization", type=float, default=None, help="Fraction of GPU memory on CUDA (0.90).")
@click.option("--embedding-model", default=None,
              help="Also serve POST /v1/embeddings with this encoder directory (or `default`: all-MiniLM-L6-v2).")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Where uploaded files (/v1/files) and their database live (default: "
                   "$XDG_DATA_HOME/tokenmill/serve, else ~/.local/share/tokenmill/serve).")
@click.option("--max-file-mb", type=int, default=10240, show_default=True,
              help="The largest file /v1/files accepts, in MiB.")
@click.option("--max-batch-requests", type=int, default=5_000_000, show_default=True,
              help="The most lines a batch's input file may have.")
@click.option("--gpu-hourly-rate", type=float, default=None,
              help="USD per machine-hour: the live page shows each batch's cost at this rate.")
@click.option("--batch-token-budget", type=int, default=None,
              help="Tokens of a step Batch API rows may take while online requests run or ran lately (an eighth "
                   "of it while one waits or prefills; default: --max-num-batched-tokens / 8): smaller keeps online "
                   "latency lower, at the batch's expense.")
def serve(model, config, host, port, api_key, served_model_name, max_num_seqs, max_num_batched_tokens, max_wait_ms,
          max_queued_requests, shutdown_timeout, preemption_mode, swap_space, lora, max_loras, prefix_caching, device,
          dtype,
          quantization, max_model_len, kv_cache_memory, kv_cache_dtype, attention_backend, enforce_eager,
          tensor_parallel_size, gpu_memory_utilization, embedding_model, state_dir, max_file_mb, max_batch_requests,
          gpu_hourly_rate, batch_token_budget):
    """An OpenAI-compatible HTTP server on the same engine: /v1/chat/completions, /v1/completions (streaming or
    not), /v1/embeddings, the Batch API (/v1/files, /v1/batches), /v1/models, /health, /metrics, and a live page
    of the batches at /."""
    from tokenmill.serve.app import ServeSettings
    from tokenmill.serve.app import serve as run_server

    if max_queued_requests < 1:
        raise UserError(f"--max-queued-requests must be >= 1, got {max_queued_requests}")
    if max_wait_ms < 0 or shutdown_timeout < 0:
        raise UserError("--max-wait-ms and --shutdown-timeout must be >= 0")
    if max_file_mb < 1 or max_batch_requests < 1:
        raise UserError("--max-file-mb and --max-batch-requests must be >= 1")
    if gpu_hourly_rate is not None and gpu_hourly_rate < 0:
        raise UserError(f"--gpu-hourly-rate must be >= 0, got {gpu_hourly_rate}")
    model, engine, _ = engine_and_sampling(
        config, model, dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            preemption_mode=preemption_mode, swap_space=swap_space,
                            enable_prefix_caching=prefix_caching, device=device, dtype=dtype,
                            quantization=quantization, max_model_len=max_model_len,
                            kv_cache_memory=kv_cache_memory, kv_cache_dtype=kv_cache_dtype,
                            attention_backend=attention_backend, enforce_eager=enforce_eager or None,
                            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
                            batch_token_budget=batch_token_budget, **lora_engine_options(lora, max_loras)), {})
    engine.setdefault("gpu_memory_utilization", 0.90)  # a server leaves headroom (the seeds: 0.90 serve, 0.95 run)
    from tokenmill.config import EngineConfig
    from tokenmill.model.loader import resolve_model_path

    EngineConfig.from_dict({"model": model, **engine})  # a bad option: one line, exit 2, before binding the port
    resolve_model_path(model)
    from tokenmill.serve.state_store import default_state_dir

    try:
        Path(state_dir or default_state_dir()).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--state-dir {state_dir or default_state_dir()}: {e.strerror or e}") from None
    settings = ServeSettings(engine_options={"model": model, **engine}, served_model_name=served_model_name,
                             api_key=api_key, max_wait_ms=max_wait_ms, max_queued_requests=max_queued_requests,
                             embedding_model=embedding_model, state_dir=state_dir, gpu_hourly_rate=gpu_hourly_rate,
                             max_file_bytes=max_file_mb << 20, max_batch_requests=max_batch_requests)
    return run_server(settings, host, port, shutdown_timeout)


@click.command("build-kernels")
def build_kernels():
    """Build the C++ CPU kernels now (once per machine; for images and CI), so no job pays for it."""
    from tokenmill.kernels.cpu_kernel import load_kernels

    k = load_kernels()
    if k.module is None:
        raise UserError(f"the C++ CPU kernels could not be built: {k.error}")
    how = f"built in {k.build_seconds:.1f} s" if k.build_seconds else "already built"
    click.echo(f"tokenmill: C++ CPU kernels ready ({how}): {k.path}", err=True)
    return 0
