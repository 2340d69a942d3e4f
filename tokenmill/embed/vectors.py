"""Where an embedding job's vectors go: a Parquet file built from durable row-group parts, or OpenAI Batch JSONL.

Parquet cannot be appended to after a crash (its footer is written last), so the job writes each row group as it
goes into its own small Parquet file under ``OUTPUT.parts/`` (written to a temporary name, fsynced, then renamed:
a part is either whole or absent). When the job completes, the parts are stitched in order into OUTPUT, one row
group each (small neighbours coalesced), the file is renamed into place, and the parts are removed.

Invariants: an id is in at most one of {OUTPUT, parts}; a part whose ids are already in OUTPUT (a crash between the
rename and the clean-up) is deleted on the next start, never stitched twice.

Schema: ``id`` string, ``embedding`` fixed_size_list<float32>[dim]; schema metadata ``tokenmill`` holds JSON with the
model, pooling, normalisation and truncation length.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tokenmill.embed.records import EmbedRequest, embed_id_key, openai_embedding_record
from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.files import JsonlAppender, fsync_path
from tokenmill.jobs.skeleton import done_keys

ROW_GROUP_ROWS = 65536  # stitched row groups are at least this big, except the last


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def vector_schema(dim: int, metadata: dict) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), dim))],
                     metadata={"tokenmill": json.dumps(metadata)})


def read_vector_metadata(path: Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    if b"tokenmill" not in meta:
        raise ValueError(f"{path} is not a tokenmill vectors file (no tokenmill metadata)")
    return json.loads(meta[b"tokenmill"])


def iter_vector_batches(path: Path):
    """(ids list[str], vectors [n, dim] float32) per row group."""
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        t = f.read_row_group(i)
        emb = t.column("embedding").combine_chunks()
        dim = emb.type.list_size
        vecs = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
        yield t.column("id").to_pylist(), vecs


def vector_table(ids: list[str], vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    """ids and vectors [n, dim] float32 as a table of ``schema``."""
    dim = schema.field("embedding").type.list_size
    vecs = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.table({"id": pa.array(ids, pa.string()),
                     "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim)}, schema=schema)


def write_vectors(path: Path, ids: list[str], vectors: np.ndarray, metadata: dict) -> None:
    """One Parquet file of (id, embedding) rows (a part, or a shard of a distributed job)."""
    pq.write_table(vector_table(ids, vectors, vector_schema(vectors.shape[1], metadata)), path)


def _ids_of(path: Path) -> list[str]:
    return pq.read_table(path, columns=["id"]).column("id").to_pylist()


class ParquetVectorSink:
    """Buffers (id, vector) rows; ``flush`` makes them durable as a new part; ``finalize`` builds OUTPUT."""

    def __init__(self, output: Path, dim: int, metadata: dict, sync_interval: float = 2.0,
                 part_rows: int = 8192) -> None:
        self.output = output
        self.parts = parts_dir(output)
        self.schema = vector_schema(dim, metadata)
        self.dim = dim
        self.sync_interval = sync_interval
        self.part_rows = part_rows
        self._ids: list[str] = []
        self._vecs: list[np.ndarray] = []
        self._last = time.monotonic()
        self.parts.mkdir(exist_ok=True)
        for tmp in self.parts.glob(".*.tmp"):
            tmp.unlink()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self.part_files()), default=-1)

    def part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet"))

    def done_ids(self) -> set[str]:
        """Ids already durable in OUTPUT or a part; drops parts already stitched into OUTPUT, and parts that do not
        read back (damaged outside tokenmill: parts are renamed into place whole), whose rows then run again."""
        done: set[str] = set()
        if self.output.exists():
            try:
                done = set(_ids_of(self.output))
            except Exception as e:  # pyarrow raises ArrowInvalid & co for a damaged file
                raise JobSetupError(f"{self.output} is damaged ({type(e).__name__}: {str(e)[:80]}); pass --overwrite "
                                    f"to start afresh") from None
        self.dropped = 0
        for part in self.part_files():
            try:
                ids = _ids_of(part)
            except Exception:
                part.unlink()
                self.dropped += 1
                continue
            if ids and ids[0] in done:
                part.unlink()  # stitched before a crash; its rows are in OUTPUT
                continue
            done.update(ids)
        return done

    def write(self, record_id: str, vector: np.ndarray) -> None:
        self._ids.append(record_id)
        self._vecs.append(vector)
        if len(self._ids) >= self.part_rows or time.monotonic() - self._last >= self.sync_interval:
            self.flush()

    def flush(self) -> None:
        self._last = time.monotonic()
        if not self._ids:
            return
        table = vector_table(self._ids, np.stack(self._vecs), self.schema)
        final = self.parts / f"part-{self._next:06d}.parquet"
        tmp = self.parts / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(self.parts)
        self._next += 1
        self._ids, self._vecs = [], []

    def close(self) -> None:
        self.flush()

    def abandon(self) -> None:
        """After a failure: make what it can durable; rows that do not fit run again on resume."""
        try:
            self.flush()
        except OSError:
            self._ids, self._vecs = [], []

    def finalize(self, extra: list[Path] = ()) -> int:
        """Stitches OUTPUT (if any), every part and the ``extra`` files (a distributed job's shards) into a new
        OUTPUT, keeping each id's first row; returns the number of rows."""
        self.flush()
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        rows = 0
        seen: set[str] = set()
        pending: list[pa.Table] = []
        with pq.ParquetWriter(tmp, self.schema) as writer:
            sources = ([self.output] if self.output.exists() else []) + self.part_files() + list(extra)
            for src in sources:
                f = pq.ParquetFile(src)
                for i in range(f.num_row_groups):
                    t = f.read_row_group(i).replace_schema_metadata(self.schema.metadata)
                    ids = t.column("id").to_pylist()
                    keep = [k not in seen for k in ids]
                    seen.update(ids)
                    if not all(keep):
                        t = t.filter(pa.array(keep))
                    pending.append(t)
                    if sum(len(t) for t in pending) >= ROW_GROUP_ROWS:
                        rows += _write_group(writer, pending)
                        pending = []
            if pending:
                rows += _write_group(writer, pending)
        fsync_path(tmp)
        os.replace(tmp, self.output)
        fsync_path(self.output.parent)
        shutil.rmtree(self.parts, ignore_errors=True)
        return rows


def _write_group(writer: pq.ParquetWriter, tables: list[pa.Table]) -> int:
    t = pa.concat_tables(tables)
    writer.write_table(t, row_group_size=len(t))
    return len(t)


class OpenAIVectorSink:
    """OpenAI Batch output lines (``--format openai``), appended and fsynced like ``tokenmill run``'s results."""

    def __init__(self, output: Path, model_name: str) -> None:
        self.output = output
        self.model_name = model_name
        self._out = JsonlAppender(output)

    def done_ids(self) -> set[str]:
        return done_keys(self.output, lambda r: embed_id_key(r["custom_id"]))

    def write_request(self, req: EmbedRequest, vector: np.ndarray, num_tokens: int) -> None:
        self._out.write(openai_embedding_record(req, vector, num_tokens, self.model_name))

    def flush(self) -> None:
        self._out.sync()

    def close(self) -> None:
        self._out.close()

    def abandon(self) -> None:
        self._out.abandon()

    def finalize(self) -> int:
        self.close()
        self.output.touch()
        with open(self.output, "rb") as f:
            return sum(1 for line in f if line.strip())
