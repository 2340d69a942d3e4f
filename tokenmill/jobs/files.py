"""Files of a job beside its OUTPUT: results, errors, manifest, state, lock; durable appends; resume scans.

Invariant: only complete lines (ending in a newline) count as written. A torn last line left by a kill is cut off
before the job appends again, so every record is whole and appears once.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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

    def all_files(self) -> list[Path]:
        return [self.output, self.errors, self.manifest, self.state]


class JobLockedError(RuntimeError):
    pass


class JobLock:
    """An exclusive, non-blocking flock on OUTPUT's lock file, held for the job's life (released by the OS on kill)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise JobLockedError(
                f"another tokenmill run{f' (pid {holder})' if holder else ''} is writing to this output"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


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
    """Keys of the complete records in a JSONL file (after ``repair_torn_tail``)."""
    keys = set()
    if not path.exists():
        return keys
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                keys.add(key(json.loads(line)))
    return keys


class JsonlAppender:
    """Appends records; flush + fsync at least every ``sync_interval`` seconds and on close."""

    def __init__(self, path: Path, sync_interval: float = 2.0) -> None:
        self.path = path
        self._f = open(path, "ab", buffering=1 << 20)
        self._interval = sync_interval
        self._last_sync = time.monotonic()
        self.count = 0

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        self.count += 1
        if time.monotonic() - self._last_sync >= self._interval:
            self.sync()

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()


def write_json_atomic(path: Path, data: dict) -> None:
    """Writes JSON to ``path`` by rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
