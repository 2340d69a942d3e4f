"""``OUTPUT.shards/``: where the workers of a distributed job commit their shards, and how the driver merges them.

A shard is written to a temporary file beside its final name, fsynced, then *linked* to the final name: the link
fails if that name exists, so of two copies of a shard (a straggler re-issued) exactly one commits and the other
is discarded. Temporary files of dead workers are removed when the driver starts.

Shard files: ``<run>-<shard:06d>.jsonl`` (result lines of ``tokenmill run``, OpenAI lines of ``embed --format
openai``) or ``.parquet`` (``id``, ``embedding``: ``embed``'s default). ``<run>`` is a token new for every start of
the driver, so shards of an earlier start never collide with this one's.

Invariant: the final OUTPUT holds every id at most once even if two starts of the driver committed the same row
(a worker of a killed driver that outlived it): the merge keeps an id's first record.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from tokenmill.jobs.files import fsync_path

SHARD_EXTS = (".jsonl", ".parquet")


def shards_dir(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


class ShardStore:
    def __init__(self, output: Path) -> None:
        self.output = output
        self.dir = shards_dir(output)

    def prepare(self) -> None:
        """Creates the directory; removes temporary files a dead worker left."""
        self.dir.mkdir(exist_ok=True)
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def committed(self) -> list[Path]:
        """Committed shard files, oldest first (by name: run token, then shard number)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.suffix in SHARD_EXTS and not p.name.startswith("."))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def commit(write: Callable[[Path], None], final: Path) -> bool:
        """``write(tmp)`` then fsync and link to ``final``; returns False (and discards the file) if ``final``
        already exists: another copy of the shard committed first."""
        if final.exists():
            return False
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            write(tmp)
            fsync_path(tmp)
            try:
                os.link(tmp, final)
            except OSError as e:
                if e.errno == errno.EEXIST:
                    return False
                raise
            fsync_path(final.parent)
            return True
        finally:
            tmp.unlink(missing_ok=True)


def write_jsonl(records: Iterable[dict]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            for r in records:
                try:
                    data = json.dumps(r, ensure_ascii=False).encode()
                except UnicodeEncodeError:
                    data = json.dumps(r).encode()
                f.write(data + b"\n")

    return write


def merge_jsonl(output: Path, shards: list[Path], key: Callable[[dict], str], seen: set[str]) -> int:
    """Appends the records of ``shards`` whose key is not in ``seen`` (OUTPUT's own ids) to OUTPUT and fsyncs it;
    returns how many duplicates were dropped. The caller then puts OUTPUT in input order."""
    dropped = 0
    with open(output, "ab", buffering=1 << 20) as out:
        for shard in shards:
            with open(shard, "rb") as f:
                for line in f:
                    if not line.strip():
                        continue
                    k = key(json.loads(line))
                    if k in seen:
                        dropped += 1
                        continue
                    seen.add(k)
                    out.write(line if line.endswith(b"\n") else line + b"\n")
        out.flush()
        os.fsync(out.fileno())
    return dropped


def merge_jsonl_in_order(output: Path, shards: list[Path], key: Callable[[dict], str],
                         line_of: Callable[[str], int | None]) -> tuple[int, int]:
    """OUTPUT plus the shards' records (each id's first), rewritten in input order (``line_of(key)``); returns
    (rows, duplicates dropped)."""
    from tokenmill.jobs.files import read_keys, rewrite_in_order

    output.touch()
    seen = read_keys(output, key)
    dropped = merge_jsonl(output, shards, key, seen)
    rewrite_in_order(output, lambda r: line_of(key(r)) or 0)
    return len(seen), dropped


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def shard_ids(path: Path, key: Callable[[dict], str]) -> list[str]:
    """The ids in a committed shard file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path, columns=["id"]).column("id").to_pylist()
    with open(path, "rb") as f:
        return [key(json.loads(line)) for line in f if line.strip()]
