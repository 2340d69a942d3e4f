"""Reading the input: the validation pass (pass 1), partitions, and the stream of requests to run (pass 2).

Pass 1 reads every line once, keeping only a few bytes per line (valid flag, prompt tokens, max_tokens) and a
64-bit hash per id for duplicate detection; pass 2 streams the lines of this partition that are not done yet.
Memory stays flat in the size of the file apart from those per-line counters.

``pre`` is a preprocessor (``jobs/preprocess.py`` for generation, ``embed/preprocess.py`` for embeddings): its
``process(lines)`` yields prepared items (with ``request.id_key``, ``token_ids``, ``max_tokens``) or JobErrors.

Partitions (length-balanced, deterministic): valid lines sorted by (prompt tokens, line number) are dealt
round-robin; line ``i``'s error record (if any) belongs to partition ``(i - 1) % N``.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenmill.jobs.preprocess import Prepared, Preprocessor
from tokenmill.jobs.records import JobError

CHUNK_LINES = 512


def iter_line_chunks(path: Path, chunk: int = CHUNK_LINES) -> Iterator[list[tuple[int, bytes]]]:
    """Non-blank lines as (line_no, bytes), 1-based, in chunks."""
    buf: list[tuple[int, bytes]] = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                buf.append((line_no, raw.rstrip(b"\r\n")))
                if len(buf) >= chunk:
                    yield buf
                    buf = []
    if buf:
        yield buf


def _id_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class HashSet:
    """A set of 64-bit hashes at ~8 bytes each: recent ones in a small Python set, merged in batches into a sorted
    numpy array (a Python set costs ~50 bytes per entry, which would grow with the input)."""

    def __init__(self, batch: int = 1 << 16) -> None:
        self._sorted = np.empty(0, dtype=np.uint64)
        self._recent: set[int] = set()
        self._batch = batch

    def __contains__(self, h: int) -> bool:
        if h in self._recent:
            return True
        i = int(np.searchsorted(self._sorted, np.uint64(h)))
        return i < len(self._sorted) and int(self._sorted[i]) == h

    def add(self, h: int) -> None:
        self._recent.add(h)
        if len(self._recent) >= self._batch:
            fresh = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
            self._sorted = np.union1d(self._sorted, fresh)
            self._recent.clear()


@dataclass
class ScanResult:
    num_lines: int
    valid: bytearray  # [num_lines + 1], 1 where the line is a runnable request (index = line_no)
    prompt_tokens: array  # [num_lines + 1] uint32
    max_tokens: array  # [num_lines + 1] uint32
    num_valid: int
    num_errors: int

    def valid_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens, max_tokens) of every valid line."""
        lines = np.flatnonzero(np.frombuffer(self.valid, dtype=np.uint8))
        return (np.frombuffer(self.prompt_tokens, dtype=np.uint32)[lines],
                np.frombuffer(self.max_tokens, dtype=np.uint32)[lines])


def scan(path: Path, pre: Preprocessor, on_error: Callable[[int, JobError], None]) -> ScanResult:
    valid = bytearray(1)
    prompt_tokens = array("I", [0])
    max_tokens = array("I", [0])
    seen_ids = HashSet()
    num_lines = num_valid = num_errors = 0
    for chunk in iter_line_chunks(path):
        last = chunk[-1][0]
        grow = last - num_lines
        valid.extend(bytes(grow))
        prompt_tokens.extend([0] * grow)
        max_tokens.extend([0] * grow)
        num_lines = last
        for line_no, item in pre.process(chunk):
            if not isinstance(item, JobError):
                h = _id_hash(item.request.id_key)
                if h in seen_ids:
                    item = JobError(
                        "duplicate_id", f"line {line_no}: id {item.request.id_key} already appeared on an earlier line",
                        item.request.record_id, item.request.kind != "plain",
                    )
                else:
                    seen_ids.add(h)
                    valid[line_no] = 1
                    prompt_tokens[line_no] = len(item.token_ids)
                    max_tokens[line_no] = item.max_tokens
                    num_valid += 1
                    continue
            elif item.record_id is not None and item.code != "duplicate_id":
                seen_ids.add(_id_hash(pre.id_key(item.record_id)))  # a bad line still claims its id
            num_errors += 1
            on_error(line_no, item)
    # count trailing blank lines too, so line numbers stay exact
    with open(path, "rb") as f:
        total = sum(1 for _ in f)
    grow = total - num_lines
    if grow > 0:
        valid.extend(bytes(grow))
        prompt_tokens.extend([0] * grow)
        max_tokens.extend([0] * grow)
    return ScanResult(total, valid, prompt_tokens, max_tokens, num_valid, num_errors)


def partition_members(s: ScanResult, index: int, total: int) -> bytearray:
    """1 for the valid lines of partition ``index`` of ``total``."""
    lines = np.flatnonzero(np.frombuffer(s.valid, dtype=np.uint8))  # valid line numbers, ascending
    tokens = np.frombuffer(s.prompt_tokens, dtype=np.uint32)[lines]
    order = lines[np.lexsort((lines, tokens))]  # by prompt tokens, then line number
    members = np.zeros(s.num_lines + 1, dtype=np.uint8)
    members[order[index::total]] = 1
    return bytearray(members.tobytes())


def error_in_partition(line_no: int, index: int, total: int) -> bool:
    return (line_no - 1) % total == index


def iter_todo(path: Path, members: bytearray, done_ids: set[str], pre: Preprocessor,
              on_skip: Callable[[int], None] = lambda line_no: None) -> Iterator[Prepared]:
    """Pass 2: the prepared requests of this partition whose ids are not in ``done_ids``, in input order;
    ``on_skip(line_no)`` is called for each member line already done."""
    for chunk in iter_line_chunks(path):
        mine = [(n, raw) for n, raw in chunk if members[n]]
        if not mine:
            continue
        for line_no, item in pre.process(mine):
            if isinstance(item, JobError):
                raise RuntimeError(f"line {line_no} was valid in the validation pass but not now: was the input "
                                   f"file changed while the job ran?")
            if item.request.id_key in done_ids:
                on_skip(line_no)
            else:
                yield item
