"""``tokenmill embed``, ``index`` and ``search``: the embeddings job, its ANN index and a query against it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from tokenmill.cli.common import EXIT_CODES_HELP, UserError, columns_of, job_options, quantization_option, run_job


@click.command(epilog=EXIT_CODES_HELP)
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
@job_options
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
                        overwrite=overwrite, input_format=input_format, columns=columns_of(columns, EMBED_FIELDS),
                        progress_interval=progress_interval)
    return run_job("embed", opts, ray_address, num_workers, shard_size, max_shard_retries)


@click.command()
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


@click.command()
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
