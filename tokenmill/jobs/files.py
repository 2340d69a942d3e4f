"""Files of a job beside its OUTPUT: results, errors, manifest, state, lock (and a stdin spool); durable appends;
resume scans; the final rewrite in input order.

Invariants:
- Only complete lines (ending in a newline) count as written. A torn last line left by a kill (or a full disk) is cut
  off before the job appends again, so every record is whole and appears once. A damaged line in the middle of a file
  is never guessed at: the job refuses to resume and names the line.
- A file appended to is always a prefix of what the job meant to write, even when a write fails part way.
- The lock file exists only while a job holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class JobPaths:
    output: Path

    def _beside(self, suffix: str) -> Path:
        name = self.output.name
        stem = name[: -len(self.output.suffix)] if self.output.suffix else name
        return self.output.with_name(stem + suffix)

    @property
    def errors(self) -> Path:
        return self._beside(".errors.jsonl")

    @property
    def manifest(self) -> Path:
        return self._beside(".manifest.json")

    @property
    def state(self) -> Path:
        return self._beside(".state.json")

    @property
    def lock(self) -> Path:
        return self._beside(".lock")

    @property
    def stdin(self) -> Path:
        """Where a job reading ``-`` keeps its copy of stdin until it completes."""
        return self._beside(".stdin")


class JobLockedError(RuntimeError):
    pass


class JobLock:
    """An exclusive, non-blocking flock on OUTPUT's lock file, held for the job's life (released by the OS on kill).
    ``release()`` deletes the file while still holding the lock; a process that opened the old file in between finds
    its inode unlinked after locking it and tries again on a fresh file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise JobLockedError(
                    f"another tokenmill run{f' (pid {holder})' if holder else ''} is writing to this output"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)  # locked a file its holder had just deleted: take the new one
        else:
            raise JobLockedError("could not take the job lock (it keeps changing hands)")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only directory: the stale file is harmless (flock, not existence, is the lock)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class CorruptFileError(Exception):
    """A complete line in the middle of a job file that is not a record: the file was damaged outside tokenmill."""

    def __init__(self, path: Path, line_no: int, reason: str) -> None:
        super().__init__(f"{path} line {line_no} is not a valid record ({reason})")
        self.path, self.line_no = path, line_no


def repair_torn_tail(path: Path) -> int:
    """Cuts an incomplete last line off ``path``; returns the number of bytes removed."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        pos = size
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == size and chunk.endswith(b"\n"):
                return 0
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                f.truncate(keep)
                return size - keep
            pos = start
        f.truncate(0)
        return size


def read_keys(path: Path, key: Callable[[dict], Any]) -> set:
    """Keys of the records in a JSONL file (after ``repair_torn_tail``); raises CorruptFileError for a line that is
    not a JSON object with the key."""
    keys = set()
    if not path.exists():
        return keys
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                keys.add(_record_key(path, line_no, line, key))
    return keys


def _record_key(path: Path, line_no: int, line: bytes, key: Callable[[dict], Any]):
    try:
        record = json.loads(line)
        return key(record)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CorruptFileError(path, line_no, f"{type(e).__name__}: {e}"[:120]) from None


class JsonlAppender:
    """Appends records; flush + fsync at least every ``sync_interval`` seconds and on close. The file is created at
    the first record, so a job with nothing to say leaves no empty file."""

    def __init__(self, path: Path, sync_interval: float = 2.0) -> None:
        self.path = path
        self._f = None
        self._interval = sync_interval
        self._last_sync = time.monotonic()
        self.count = 0

    def write(self, record: dict) -> None:
        try:
            data = json.dumps(record, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate got this far: escape it rather than lose the record
            data = json.dumps(record).encode()
        if self._f is None:
            self._f = open(self.path, "ab", buffering=1 << 20)
        self._f.write(data + b"\n")
        self.count += 1
        if time.monotonic() - self._last_sync >= self._interval:
            self.sync()

    def sync(self) -> None:
        self._last_sync = time.monotonic()
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self.sync()
            self._f.close()

    def abandon(self) -> None:
        """Closes after a failure without raising: writes what it can (a prefix; a torn last line is cut on resume)."""
        if self._f is not None and not self._f.closed:
            try:
                self._f.close()  # flushes what fits, then closes the file even if the flush fails
            except OSError:
                pass


def write_json_atomic(path: Path, data: dict, durable: bool = False, indent: int | None = 1) -> None:
    """Writes JSON to ``path`` by rename, so a reader never sees half a file; ``durable`` also fsyncs it."""
    write_lines_atomic(path, [json.dumps(data, indent=indent).encode()], durable, newline=False)


def write_lines_atomic(path: Path, lines, durable: bool = False, newline: bool = True) -> None:
    """Writes byte strings (each followed by a newline, unless ``newline`` is False) to ``path`` by rename, so a
    reader never sees half a file and a crash leaves the old file whole; ``durable`` also fsyncs it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            for line in lines:
                f.write(line + b"\n" if newline else line)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so a rename in it is durable) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_in_order(path: Path, order_key: Callable[[dict], int]) -> bool:
    """Rewrites a JSONL file with its records sorted by ``order_key`` (stable), through a temporary file, fsync and
    rename, so a crash leaves either the old or the new file (the same records). Memory: ~20 bytes a record.
    Returns whether the file needed it."""
    offsets, lengths, keys = array("q"), array("q"), array("q")
    with open(path, "rb") as f:
        pos = 0
        for line_no, line in enumerate(f, 1):
            if line.strip():
                offsets.append(pos)
                lengths.append(len(line))
                keys.append(_record_key(path, line_no, line, order_key))
            pos += len(line)
    k = np.frombuffer(keys, dtype=np.int64)
    if k.size < 2 or bool(np.all(k[:-1] <= k[1:])):
        return False
    order = np.argsort(k, kind="stable")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb", buffering=1 << 20) as dst:
            fd = src.fileno()
            for i in order:
                dst.write(os.pread(fd, lengths[i], offsets[i]))
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent if str(path.parent) else Path("."))
    return True
