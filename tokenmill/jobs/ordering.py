"""Whole-dataset scheduling for ``tokenmill run``: rows that share a prompt prefix run close together.

An online engine only sees its queue; a batch job sees the whole dataset before it starts. In its validation pass
the runner records a small signature per line (``PrefixSignatures``: 40 bytes, never the prompt, so memory stays
small on huge inputs); ``dataset_order`` sorts the partition's lines by it, so that lines sharing their first 16,
32, 64, ... 2,048 tokens (a radix tree, approximated level by level) and exact duplicates sit next to each other,
longest prompts first within a group. With prefix caching, a group's shared blocks are then computed once and hit by the
rest of the group while they are still in the cache, however far apart the rows are in the file.

``iter_in_order`` reads the requests in that order with bounded memory: in rounds of about ``ROUND_TOKENS`` prompt
tokens, each one sequential pass over the input that keeps the raw bytes of that round's lines only (any format:
compressed JSONL, CSV and Parquet are not seekable by line). A dataset with nothing to share keeps input order and
the single streaming pass.
"""

from __future__ import annotations

import hashlib
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from tokenmill.engine.loop import dedupe_key
from tokenmill.jobs.errors import JobFault
from tokenmill.jobs.inputs import InputSource
from tokenmill.jobs.preprocess import Prepared, Preprocessor
from tokenmill.jobs.scan import iter_line_chunks, iter_todo, prepare_again
from tokenmill.sampling_params import SamplingParams

LEVELS = (16, 32, 64, 128, 256, 512, 1024, 2048)  # prompt prefix lengths (tokens) hashed into a signature
ROUND_TOKENS = 16 << 20  # prompt tokens per ordered round (~80 MB of raw JSON held at most)
MIN_SHARED_FRACTION = 0.05  # ordering is used when at least this share of prompt tokens could hit the cache
PROCESS_CHUNK = 256


def _hash32(token_ids) -> int:
    return hash(tuple(token_ids)) & 0xFFFFFFFF  # ints and tuples of ints hash the same in every process


class PrefixSignatures:
    """Per input line (index = line number): the 32-bit hashes of its prompt's first ``LEVELS`` tokens (never its
    last token, which is always computed) and a 64-bit hash of its ``dedupe_key`` (0 when it has none)."""

    def __init__(self) -> None:
        self.levels = [array("I", [0]) for _ in LEVELS]
        self.dedupe = array("Q", [0])

    def grow(self, num_lines: int) -> None:
        extra = num_lines + 1 - len(self.dedupe)
        if extra > 0:
            for a in self.levels:
                a.extend([0] * extra)
            self.dedupe.extend([0] * extra)

    def record(self, line_no: int, token_ids: list[int], params: SamplingParams) -> None:
        n = len(token_ids) - 1
        # a LoRA adapter's rows share no cached block with other adapters' (the cache salts them), so the adapter is
        # part of every level's key: same-adapter rows group, and sharing is counted only where the cache can hit
        salt = (zlib.crc32(params.lora.encode()),) if params.lora is not None else ()
        for a, length in zip(self.levels, LEVELS):
            a[line_no] = _hash32(salt + tuple(token_ids[:min(length, n)]))
        key = dedupe_key(token_ids, params)
        if key is not None:
            digest = hashlib.blake2b(np.asarray(token_ids, dtype=np.uint32).tobytes() + repr(key[1]).encode(),
                                     digest_size=8).digest()
            self.dedupe[line_no] = int.from_bytes(digest, "little") or 1


@dataclass
class DatasetOrder:
    lines: np.ndarray  # [n] uint32 line numbers, in the order to run them
    shared_tokens: int  # prompt tokens a line shares with the line before it (estimated from the signatures)
    duplicates: int  # lines identical to the line before them (dedupe candidates)


def dataset_order(sig: PrefixSignatures, lines: np.ndarray, prompt_tokens: np.ndarray) -> DatasetOrder:
    """``lines`` sorted so that shared prefixes and duplicates are adjacent (longest prompt first in a group, then
    input order), with the estimated sharing that order exposes. ``prompt_tokens[i]`` belongs to ``lines[i]``."""
    levels = [np.frombuffer(a, dtype=np.uint32)[lines] for a in sig.levels]
    dedupe = np.frombuffer(sig.dedupe, dtype=np.uint64)[lines]
    lengths = np.asarray(prompt_tokens, dtype=np.int64)
    order = np.lexsort((lines, -lengths, dedupe, *levels[::-1]))  # the last key is the primary one
    depth = np.zeros(len(order), dtype=np.int64)  # how many leading levels each line shares with its predecessor
    same = np.ones(max(0, len(order) - 1), dtype=bool)
    for k, level in enumerate(levels):
        s = level[order]
        same &= s[1:] == s[:-1]
        depth[1:] += same
    reach = np.array((0, *LEVELS), dtype=np.int64)[depth]
    shared = np.minimum(reach, np.maximum(lengths[order] - 1, 0))
    d = dedupe[order]
    dups = int(np.count_nonzero((d[1:] == d[:-1]) & (d[1:] != 0))) if len(d) > 1 else 0
    return DatasetOrder(lines[order].astype(np.uint32), int(shared.sum()), dups)


def choose_order(sig: PrefixSignatures, lines: np.ndarray, prompt_tokens: np.ndarray, prefix_caching: bool,
                 dedupe: bool) -> DatasetOrder | None:
    """The grouped order when it pays: rows repeat (and are deduplicated), or, with prefix caching, at least
    ``MIN_SHARED_FRACTION`` of the prompt tokens could be shared. None: keep input order."""
    order = dataset_order(sig, lines, prompt_tokens)
    total = int(np.asarray(prompt_tokens, dtype=np.int64).sum())
    if (dedupe and order.duplicates) or (prefix_caching and order.shared_tokens >= MIN_SHARED_FRACTION * max(1, total)):
        return order
    return None


def job_order(dataset_order: str, sig: PrefixSignatures | None, lines: np.ndarray, prompt_tokens: np.ndarray,
              prefix_caching: bool, dedupe: bool) -> DatasetOrder | None:
    """The order a generation job (``tokenmill run``, a ``--ray`` driver's shards) runs ``lines`` in: grouped
    (``choose_order``) unless ``dataset_order`` is "input" or nothing pays; None keeps input order."""
    if dataset_order == "input" or sig is None:
        return None
    return choose_order(sig, lines, prompt_tokens, prefix_caching, dedupe)


def iter_job_rows(source: InputSource, members: bytearray, order: DatasetOrder | None, prompt_tokens: array,
                  done_ids: set[str], pre: Preprocessor,
                  on_skip: Callable[[int], None] = lambda line_no: None) -> Iterator[Prepared]:
    """The prepared rows of ``members`` not in ``done_ids``: in ``order`` (``iter_in_order``) or, with None, in
    input order (``scan.iter_todo``)."""
    if order is None:
        return iter_todo(source, members, done_ids, pre, on_skip=on_skip)
    return iter_in_order(source, order.lines, prompt_tokens, done_ids, pre, on_skip=on_skip)


def iter_in_order(source: InputSource, order: np.ndarray, prompt_tokens: array, done_ids: set[str],
                  pre: Preprocessor, on_skip: Callable[[int], None] = lambda line_no: None,
                  round_tokens: int = ROUND_TOKENS) -> Iterator[Prepared]:
    """The prepared requests of the lines in ``order``, in that order, skipping ids in ``done_ids`` (calling
    ``on_skip(line_no)`` for each). Raises JobFault if the input no longer holds what the validation pass read."""
    if len(order) == 0:
        return
    cost = np.frombuffer(prompt_tokens, dtype=np.uint32)[order].astype(np.int64)
    round_of = (np.cumsum(cost) - cost) // max(1, round_tokens)  # a round starts where its first line starts
    starts = np.flatnonzero(np.diff(round_of, prepend=-1)).tolist() + [len(order)]
    for a, b in zip(starts[:-1], starts[1:]):
        wanted = order[a:b]
        mask = np.zeros(int(wanted.max()) + 1, dtype=bool)
        mask[wanted] = True
        raw: dict[int, bytes] = {}
        for chunk in iter_line_chunks(source):
            for line_no, row in chunk:
                if line_no < len(mask) and mask[line_no]:
                    raw[line_no] = row
        if len(raw) != b - a:
            raise JobFault(f"the input now has {len(raw)} of the {b - a} lines the validation pass read in this "
                           f"part: the input file was changed while the job ran; restore it and run the same command "
                           f"to resume")
        for i in range(0, b - a, PROCESS_CHUNK):
            part = [(int(n), raw.pop(int(n))) for n in wanted[i:i + PROCESS_CHUNK]]
            yield from prepare_again(pre, part, done_ids, on_skip)
