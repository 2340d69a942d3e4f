"""What a distributed job does that depends on its kind: generation (``tokenmill run --ray``) or embeddings
(``tokenmill embed --ray``). Each kind gives the driver its preprocessor, manifest, ids already done, the engine
options its workers start with, and the merge of the committed shards into OUTPUT."""

from __future__ import annotations

from pathlib import Path

from tokenmill.distributed.store import ShardStore, merge_jsonl_in_order, parquet_rows
from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.files import JobPaths
from tokenmill.jobs.results import output_id_key
from tokenmill.jobs.skeleton import done_keys


class GenerationKind:
    name, unit = "run", "request"

    def __init__(self, opts) -> None:
        from tokenmill.jobs.inputs import RUN_FIELDS
        from tokenmill.jobs.runner import JobContext

        if opts.total_partitions != 1:
            raise JobSetupError("--ray and --partition do not mix: the Ray job spreads the whole input itself")
        self.opts, self.fields = opts, RUN_FIELDS
        self.ctx = JobContext(opts.model, opts.engine_options, opts.sampling(), opts.context_overflow, opts.task)
        self.pre = self.ctx.pre
        self.model_name = self.ctx.info.model_name
        self.device = self.ctx.info.config.device
        self.tp_size = self.ctx.info.config.tensor_parallel_size  # each worker's engine: a TP group of this many ranks

    def manifest(self, identity: dict) -> dict:
        from tokenmill.jobs.runner import manifest_for

        return manifest_for(self.opts, self.ctx, identity)

    def signatures(self):
        """Prefix signatures for the validation pass to fill (``jobs/ordering.py``), or None."""
        from tokenmill.jobs.ordering import PrefixSignatures

        return PrefixSignatures() if self.opts.dataset_order == "auto" else None

    def todo(self, source, scanned, signatures, done: set[str]):
        """The rows to cut into shards, in the order ``tokenmill run`` would run them (``ordering.job_order``):
        grouped by shared prefix when that pays, so a shard holds a group and its worker's cache computes the
        group's prefix once, and identical rows are adjacent (the driver keeps them in one shard)."""
        import numpy as np

        from tokenmill.jobs.ordering import iter_job_rows, job_order

        lines = np.flatnonzero(np.frombuffer(scanned.valid, dtype=np.uint8))
        prompt = np.frombuffer(scanned.prompt_tokens, dtype=np.uint32)[lines]
        order = job_order(self.opts.dataset_order, signatures, lines, prompt, self.ctx.info.config.enable_prefix_caching,
                          self.opts.dedupe)
        return iter_job_rows(source, scanned.valid, order, scanned.prompt_tokens, done, self.pre)

    def done_ids(self, paths: JobPaths) -> set[str]:
        return done_keys(paths.output, output_id_key)

    def same_work(self, a, b) -> bool:
        """Whether two prepared rows would be computed once (the worker's dedupe): the driver never cuts a shard
        between them, so with the grouped order every distinct row of the job is computed once."""
        from tokenmill.engine.loop import dedupe_key

        if not self.opts.dedupe:
            return False
        key = dedupe_key(a.token_ids, a.params)
        return key is not None and key == dedupe_key(b.token_ids, b.params)

    key = staticmethod(output_id_key)

    def worker_spec(self, scanned, threads: int) -> dict:
        plan = self.ctx.plan(*scanned.valid_lengths())
        options = {"model": str(self.ctx.info.path), **self.opts.engine_options}
        options.setdefault("max_num_seqs", plan.recommended_max_num_seqs)
        options.setdefault("max_num_batched_tokens", plan.recommended_max_num_batched_tokens)
        options.setdefault("num_threads", threads)
        options["model_name"] = self.model_name
        options["score_tokens"] = self.opts.score_tokens  # --task score: rows scored, records as a single run's
        options["dedupe"] = self.opts.dedupe  # a shard's identical rows computed once, as in a single run
        return options

    def finalize(self, paths: JobPaths, store: ShardStore, scanned) -> tuple[int, int]:
        """Merges the shards into OUTPUT in input order; returns (rows, duplicates dropped)."""
        return merge_jsonl_in_order(paths.output, store.committed(), self.key, scanned.line_of)

    def extra_files(self) -> tuple[Path, ...]:
        return ()


class EmbedKind:
    name, unit = "embed", "text"

    def __init__(self, opts) -> None:
        from tokenmill.embed.job import load_embedder
        from tokenmill.embed.preprocess import EmbedPreprocessor
        from tokenmill.jobs.inputs import EMBED_FIELDS

        self.opts, self.fields = opts, EMBED_FIELDS
        self.emb = load_embedder(opts)
        self.pre = EmbedPreprocessor(self.emb)
        self.model_name = self.emb.model_name
        self.device = opts.device
        self.tp_size = 1

    @staticmethod
    def key(r: dict) -> str:
        from tokenmill.embed.records import embed_id_key

        return embed_id_key(r["custom_id"])

    def signatures(self):
        return None  # texts to embed share no KV cache: input order

    @staticmethod
    def same_work(a, b) -> bool:
        return False  # each text is embedded (no dedupe)

    def todo(self, source, scanned, signatures, done: set[str]):
        from tokenmill.jobs.scan import iter_todo

        return iter_todo(source, scanned.valid, done, self.pre)

    def manifest(self, identity: dict) -> dict:
        from tokenmill.embed.job import embed_manifest

        return embed_manifest(self.opts, self.emb, identity)

    def _sink(self, paths: JobPaths):
        from tokenmill.embed.vectors import OpenAIVectorSink, ParquetVectorSink

        if self.opts.format == "parquet":
            return ParquetVectorSink(paths.output, self.emb.dim, self.emb.describe())
        return OpenAIVectorSink(paths.output, self.model_name)

    def done_ids(self, paths: JobPaths) -> set[str]:
        return self._sink(paths).done_ids()

    def worker_spec(self, scanned, threads: int) -> dict:
        o = self.opts
        return {"model": str(self.emb.path), "dtype": o.dtype, "device": o.device,
                "max_batch_tokens": o.max_batch_tokens, "pooling": o.pooling, "normalize": o.normalize,
                "max_seq_length": o.max_seq_length, "format": o.format, "num_threads": threads,
                "window_tokens": o.window_tokens}

    def finalize(self, paths: JobPaths, store: ShardStore, scanned) -> tuple[int, int]:
        if self.opts.format == "parquet":
            sink = self._sink(paths)
            sources = ([paths.output] if paths.output.exists() else []) + sink.part_files() + store.committed()
            before = sum(parquet_rows(p) for p in sources)
            rows = sink.finalize(extra=store.committed())
            return rows, before - rows
        return merge_jsonl_in_order(paths.output, store.committed(), self.key, scanned.line_of)

    def extra_files(self) -> tuple[Path, ...]:
        from tokenmill.embed.vectors import parts_dir

        return (parts_dir(self.opts.output),)
