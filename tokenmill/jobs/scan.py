"""Reading the input: the validation pass (pass 1), partitions, and the stream of requests to run (pass 2).

Pass 1 reads every line once, keeping only a few bytes per line (valid flag, prompt tokens, max_tokens) and a
64-bit hash and line number per id (duplicate detection, and the input order of the results at the end); pass 2
streams the lines of this partition that are not done yet. Memory stays flat in the size of the file apart from
those per-line counters. Both passes read the ``InputSource`` (``jobs/inputs.py``), which holds the file open.

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
from typing import TYPE_CHECKING

import numpy as np

from tokenmill.jobs.errors import JobFault
from tokenmill.jobs.inputs import InputSource, RawRow
from tokenmill.jobs.preprocess import Prepared, Preprocessor
from tokenmill.jobs.records import JobError

if TYPE_CHECKING:
    from tokenmill.jobs.ordering import PrefixSignatures

CHUNK_LINES = 512


def iter_line_chunks(source: InputSource, chunk: int = CHUNK_LINES) -> Iterator[list[tuple[int, RawRow]]]:
    """Non-blank lines (or table rows) as (line_no, raw), 1-based, in chunks."""
    buf: list[tuple[int, RawRow]] = []
    for line_no, raw in source.iter_lines():
        if not isinstance(raw, bytes) or raw.strip():
            buf.append((line_no, raw))
            if len(buf) >= chunk:
                yield buf
                buf = []
    if buf:
        yield buf


def _id_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class IdIndex:
    """64-bit id hashes with the line each came from, at ~12 bytes an id: recent ones in a small dict, merged in
    batches into sorted numpy arrays (a Python set costs ~50 bytes an entry, which would grow with the input)."""

    def __init__(self, batch: int = 1 << 16) -> None:
        self._hashes = np.empty(0, dtype=np.uint64)
        self._lines = np.empty(0, dtype=np.uint32)
        self._recent: dict[int, int] = {}
        self._batch = batch

    def __contains__(self, h: int) -> bool:
        return self.line_of(h) is not None

    def line_of(self, h: int) -> int | None:
        if h in self._recent:
            return self._recent[h]
        i = int(np.searchsorted(self._hashes, np.uint64(h)))
        return int(self._lines[i]) if i < len(self._hashes) and int(self._hashes[i]) == h else None

    def add(self, h: int, line_no: int) -> None:
        self._recent[h] = line_no
        if len(self._recent) >= self._batch:
            self._merge()

    def _merge(self) -> None:
        hashes = np.concatenate([self._hashes, np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))])
        lines = np.concatenate([self._lines, np.fromiter(self._recent.values(), dtype=np.uint32,
                                                         count=len(self._recent))])
        order = np.argsort(hashes, kind="stable")
        self._hashes, self._lines = hashes[order], lines[order]
        self._recent.clear()


@dataclass
class ScanResult:
    num_lines: int
    valid: bytearray  # [num_lines + 1], 1 where the line is a runnable request (index = line_no)
    prompt_tokens: array  # [num_lines + 1] uint32
    max_tokens: array  # [num_lines + 1] uint32
    num_valid: int
    num_errors: int
    ids: IdIndex  # id hash -> its (first) line

    def line_of(self, key: str) -> int | None:
        """The input line of the id whose ``id_key`` is ``key``."""
        return self.ids.line_of(_id_hash(key))

    def valid_lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens, max_tokens) of every valid line."""
        lines = np.flatnonzero(np.frombuffer(self.valid, dtype=np.uint8))
        return (np.frombuffer(self.prompt_tokens, dtype=np.uint32)[lines],
                np.frombuffer(self.max_tokens, dtype=np.uint32)[lines])


def scan(source: InputSource, pre: Preprocessor, on_error: Callable[[int, JobError], None],
         signatures: PrefixSignatures | None = None) -> ScanResult:
    """Pass 1: validates every line (errors to ``on_error``) and records each valid line's lengths and, when given,
    its prefix signature (``jobs/ordering.py``)."""
    valid = bytearray(1)
    prompt_tokens = array("I", [0])
    max_tokens = array("I", [0])
    seen_ids = IdIndex()
    num_lines = num_valid = num_errors = 0
    for chunk in iter_line_chunks(source):
        last = chunk[-1][0]
        grow = last - num_lines
        valid.extend(bytes(grow))
        prompt_tokens.extend([0] * grow)
        max_tokens.extend([0] * grow)
        num_lines = last
        if signatures is not None:
            signatures.grow(num_lines)
        for line_no, item in pre.process(chunk):
            if not isinstance(item, JobError):
                h = _id_hash(item.request.id_key)
                if h in seen_ids:
                    item = JobError(
                        "duplicate_id", f"line {line_no}: id {item.request.id_key} already appeared on line "
                        f"{seen_ids.line_of(h)}", item.request.record_id, item.request.kind != "plain",
                    )
                else:
                    seen_ids.add(h, line_no)
                    valid[line_no] = 1
                    prompt_tokens[line_no] = len(item.token_ids)
                    max_tokens[line_no] = item.max_tokens
                    if signatures is not None:
                        signatures.record(line_no, item.token_ids, item.params)
                    num_valid += 1
                    continue
            elif item.record_id is not None and item.code != "duplicate_id":
                h = _id_hash(pre.id_key(item.record_id))
                if h not in seen_ids:
                    seen_ids.add(h, line_no)  # a bad line still claims its id
            num_errors += 1
            on_error(line_no, item)
    grow = source.num_lines - num_lines  # trailing blank lines count too, so line numbers stay exact
    if grow > 0:
        valid.extend(bytes(grow))
        prompt_tokens.extend([0] * grow)
        max_tokens.extend([0] * grow)
        if signatures is not None:
            signatures.grow(source.num_lines)
    return ScanResult(max(source.num_lines, num_lines), valid, prompt_tokens, max_tokens, num_valid, num_errors,
                      seen_ids)


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


def prepare_again(pre: Preprocessor, lines: list[tuple[int, RawRow]], done_ids: set[str],
                  on_skip: Callable[[int], None]) -> Iterator[Prepared]:
    """Pass 2 on lines pass 1 found valid: their prepared requests, less the ids in ``done_ids`` (``on_skip(line_no)``
    for each); a JobFault if one is no longer valid (the input changed under the job)."""
    for line_no, item in pre.process(lines):
        if isinstance(item, JobError):
            raise JobFault(f"input line {line_no} was valid in the validation pass but not now: the input file "
                           f"was changed while the job ran; restore it and run the same command to resume")
        if item.request.id_key in done_ids:
            on_skip(line_no)
        else:
            yield item


def iter_todo(source: InputSource, members: bytearray, done_ids: set[str], pre: Preprocessor,
              on_skip: Callable[[int], None] = lambda line_no: None) -> Iterator[Prepared]:
    """Pass 2: the prepared requests of this partition whose ids are not in ``done_ids``, in input order;
    ``on_skip(line_no)`` is called for each member line already done. Raises JobFault if the input no longer holds
    what pass 1 read (a member line turned invalid, or lines went missing)."""
    expected = members.count(1)
    seen = 0
    for chunk in iter_line_chunks(source):
        mine = [(n, raw) for n, raw in chunk if n < len(members) and members[n]]
        if not mine:
            continue
        seen += len(mine)
        yield from prepare_again(pre, mine, done_ids, on_skip)
    if seen != expected:
        raise JobFault(f"the input now has {seen} of the {expected} valid lines the validation pass read: the input "
                       f"file was changed while the job ran; restore it and run the same command to resume")
