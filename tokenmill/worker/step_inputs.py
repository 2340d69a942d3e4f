"""StepBuffers: a step's integer inputs laid out in one persistent buffer, reaching the device in one copy.

Every int64 input of a forward pass lives in a fixed region of one host buffer (pinned on CUDA) with a device twin:

    [input_ids | positions | slot_mapping : max_tokens each][query_start_loc : max_reqs + 1][seq_lens | sample_rows :
    max_reqs each][block_tables : max_reqs * max_blocks]

A step fills the host regions in numpy and copies the used prefix (everything up to the end of this step's block
table) to the device once, non-blocking; the tensors the model gets are views of the device twin. On CPU the twin is
the host buffer itself: no copy at all. The step's block table is packed [num_reqs, width] at the start of its
region (width = the step's widest request), so kernels see a contiguous table: a gather of the requests' rows of the
persistent ``BlockTable`` (worker/block_table.py), where only new blocks are written.

Invariants: regions never move while the capacity suffices (a capacity change reallocates, before the step's
fill); each ``fill`` returns new view objects (``RotaryEmbedding`` caches by the positions tensor's identity); the
host buffer is rewritten only by the next ``fill``, after the previous step's sampled ids were read back (that read
waits for the copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.core.step import ScheduledRequest
from tokenmill.worker.block_table import BlockTable


@dataclass
class StepInputs:
    """Device views of one step's inputs (shapes in the comments; all int64)."""

    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens]
    query_start_loc: torch.Tensor  # [num_reqs + 1]
    seq_lens: torch.Tensor  # [num_reqs]
    sample_rows: torch.Tensor  # [num_sampled]: the flat-batch row of each sampling request's last token
    block_tables: torch.Tensor  # [num_reqs, width]
    block_table_np: np.ndarray  # the same table on the host
    query_start_loc_list: list[int]  # host ints (the attention metadata's)
    seq_lens_list: list[int]


class StepBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, device: torch.device,
                 long_rope: tuple[int, int] | None = None) -> None:
        """``long_rope``: (from, offset) for a LongRoPE model: a token's position is written plus ``offset`` (the
        rotary table's long half, ``RotaryEmbedding.long_offset``) when its request's prompt is longer than
        ``from`` or the token sits at ``from`` or later (``RopeConfig.long_rope_from``)."""
        self.device = torch.device(device)
        self.long_rope = long_rope
        self.block_table = BlockTable(max_reqs, max_blocks)  # rank 0's requests' rows (a TP follower never fills)
        self._allocate(max_tokens, max_reqs, max_blocks)

    def _allocate(self, max_tokens: int, max_reqs: int, max_blocks: int) -> None:
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        t, r = max_tokens, max_reqs
        self._off = {"input_ids": 0, "positions": t, "slot_mapping": 2 * t, "query_start_loc": 3 * t,
                     "seq_lens": 3 * t + r + 1, "sample_rows": 3 * t + 2 * r + 1, "block_tables": 3 * t + 3 * r + 1}
        size = self._off["block_tables"] + r * max_blocks
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=cuda)
        self.host_np = self.host.numpy()
        self.dev = torch.zeros(size, dtype=torch.int64, device=self.device) if cuda else self.host

    def _host(self, name: str, n: int) -> np.ndarray:
        start = self._off[name]
        return self.host_np[start:start + n]

    def _dev(self, name: str, n: int) -> torch.Tensor:
        start = self._off[name]
        return self.dev[start:start + n]

    def fill(self, chunks: list[ScheduledRequest], block_size: int) -> StepInputs:
        """Lays out ``chunks`` (decodes first, as the runner orders them) and copies them to the device. Per chunk
        only its token ids and a few ints are read in Python; positions, slots, lengths and the table are array
        operations over the whole step (the rows come from the persistent ``block_table``)."""
        num_reqs = len(chunks)
        rows, width = self.block_table.sync(chunks)
        # per chunk: first new position, new tokens, tokens the request has (it samples when the chunk ends there)
        meta = np.array([(s.num_computed_tokens, s.num_scheduled_tokens, s.request.num_tokens) for s in chunks],
                        dtype=np.int64).reshape(num_reqs, 3)
        starts, counts = meta[:, 0], meta[:, 1]
        num_tokens = int(counts.sum())
        if num_tokens > self.max_tokens or num_reqs > self.max_reqs or width > self.max_blocks:
            self._allocate(max(num_tokens, self.max_tokens), max(num_reqs, self.max_reqs),
                           max(width, self.max_blocks))
        ids, pos, slots = (self._host(n, num_tokens) for n in ("input_ids", "positions", "slot_mapping"))
        qsl = self._host("query_start_loc", num_reqs + 1)
        seq_lens = self._host("seq_lens", num_reqs)
        table = self._host("block_tables", num_reqs * width).reshape(num_reqs, width)
        np.take(self.block_table.table[:, :width], rows, axis=0, out=table)
        qsl[0] = 0
        np.cumsum(counts, out=qsl[1:])
        np.add(starts, counts, out=seq_lens)
        req = np.repeat(np.arange(num_reqs), counts)  # [num_tokens]: each token's chunk
        p = np.arange(num_tokens, dtype=np.int64) + (starts - qsl[:-1])[req]  # [num_tokens]: positions
        pos[:] = p
        if self.long_rope is not None:
            first, offset = self.long_rope
            prompt_long = np.array([s.request.num_prompt_tokens > first for s in chunks], dtype=bool)
            pos += offset * ((p >= first) | prompt_long[req])
        slots[:] = table[req, p // block_size] * block_size + p % block_size
        if num_tokens == num_reqs:  # decodes only (or one-token chunks): one id each
            ids[:] = [s.request.all_token_ids[s.num_computed_tokens] for s in chunks]
        else:
            flat = []
            for s in chunks:
                start = s.num_computed_tokens
                flat.extend(s.request.all_token_ids[start:start + s.num_scheduled_tokens])
            ids[:] = flat
        sample_rows = (qsl[1:] - 1)[seq_lens == meta[:, 2]]
        self._host("sample_rows", len(sample_rows))[:] = sample_rows
        self.shape = StepShape(num_tokens, num_reqs, width, len(sample_rows))
        used = self.used(self.shape)
        if self.dev is not self.host:
            self.dev[:used].copy_(self.host[:used], non_blocking=True)
        return self.views(self.shape)

    def used(self, shape: "StepShape") -> int:
        """Length of the buffer prefix a step of ``shape`` fills (what is copied, and broadcast to TP ranks)."""
        return self._off["block_tables"] + shape.num_reqs * shape.width

    def capacity(self) -> tuple[int, int, int]:
        return self.max_tokens, self.max_reqs, self.max_blocks

    def ensure_capacity(self, capacity: tuple[int, int, int]) -> None:
        """The exact layout of another rank's buffers (a tensor-parallel worker receives rank 0's prefix as is)."""
        if capacity != self.capacity():
            self._allocate(*capacity)

    def views(self, shape: "StepShape") -> StepInputs:
        """The device views of a filled (or received) step of ``shape``, and the host copies attention needs."""
        t, r, w = shape.num_tokens, shape.num_reqs, shape.width
        return StepInputs(
            input_ids=self._dev("input_ids", t),
            positions=self._dev("positions", t),
            slot_mapping=self._dev("slot_mapping", t),
            query_start_loc=self._dev("query_start_loc", r + 1),
            seq_lens=self._dev("seq_lens", r),
            sample_rows=self._dev("sample_rows", shape.num_sampled),
            block_tables=self._dev("block_tables", r * w).view(r, w),
            block_table_np=self._host("block_tables", r * w).reshape(r, w),
            query_start_loc_list=self._host("query_start_loc", r + 1).tolist(),
            seq_lens_list=self._host("seq_lens", r).tolist(),
        )


@dataclass(frozen=True)
class StepShape:
    """The sizes of one step's inputs (what a tensor-parallel worker needs to read the buffer rank 0 sent)."""

    num_tokens: int
    num_reqs: int
    width: int  # block-table columns
    num_sampled: int
