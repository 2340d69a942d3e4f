"""BlockTable: every live request's block ids in a row of one host table that persists across steps.

A request's row is written when the request first runs, and after that only the blocks it gains are appended: a
decode step rewrites nothing but the one block a request gains every ``block_size`` tokens, where building the table
anew cost a numpy conversion per request per step. A step's packed table is then one gather of its requests' rows
(``StepBuffers.fill``).

What the runner keeps for one request lives in one record, ``RequestState``, on the request itself
(``Request.worker_state``): its row and the grammar matcher of a constrained request. It goes when the request
finishes (``release``), so nothing of a finished request lingers in a dict of its own.

Invariants: a row holds its request's blocks in order and zeros after them (a row is zeroed when it is released or
its request's blocks are replaced), so a gathered table has zeros in its holes, as kernels and CUDA graphs expect.
The KV manager extends a request's block list in place and gives it a new list whenever its blocks change in any
other way (admitted again after a preemption, swapped back in): a list other than the one a row mirrors means the
row is rewritten from its start. The state keeps the list it mirrors alive, so ``is`` cannot mistake a new list for
a freed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenmill.core.step import ScheduledRequest


@dataclass(eq=False)
class RequestState:
    """The runner's record of one request (``Request.worker_state``)."""

    row: int  # its row of the block table
    blocks: list[int] | None = None  # the KV manager's block list the row mirrors
    num_written: int = 0  # how many of those blocks the row holds
    matcher: object | None = None  # a constrained request's grammar matcher (structured/backend.py)


class BlockTable:
    def __init__(self, num_rows: int, max_blocks: int) -> None:
        self.table = np.zeros((max(1, num_rows), max(1, max_blocks)), dtype=np.int64)  # [rows, max_blocks]
        self._free_rows = list(range(self.table.shape[0] - 1, -1, -1))  # a stack: row 0 is handed out first

    @property
    def num_live(self) -> int:
        """Rows held by requests (a test's leak check)."""
        return self.table.shape[0] - len(self._free_rows)

    def sync(self, chunks: list[ScheduledRequest]) -> tuple[list[int], int]:
        """Brings the rows of ``chunks``' requests up to date (a state for a request running the first time).
        Returns each chunk's row and the step's width (its longest block list)."""
        rows = []
        width = 0
        for s in chunks:
            req = s.request
            state = req.worker_state
            if state is None:
                state = req.worker_state = RequestState(self._take_row())
            blocks = s.block_ids
            n = len(blocks)
            if state.blocks is not blocks:  # new blocks altogether: rewrite the row
                self.table[state.row, n:state.num_written] = 0
                state.blocks, state.num_written = blocks, 0
            if n > state.num_written:
                if n > self.table.shape[1]:
                    self._grow(self.table.shape[0], n)
                self.table[state.row, state.num_written:n] = blocks[state.num_written:]
                state.num_written = n
            rows.append(state.row)
            width = max(width, n)
        return rows, width

    def release(self, state: RequestState) -> None:
        """A finished request's row goes back, zeroed."""
        self.table[state.row, :state.num_written] = 0
        state.blocks, state.num_written = None, 0
        self._free_rows.append(state.row)

    def _take_row(self) -> int:
        if not self._free_rows:
            n = self.table.shape[0]
            self._grow(2 * n, self.table.shape[1])
            self._free_rows = list(range(2 * n - 1, n - 1, -1))
        return self._free_rows.pop()

    def _grow(self, num_rows: int, max_blocks: int) -> None:
        old = self.table
        self.table = np.zeros((num_rows, max_blocks), dtype=np.int64)
        self.table[:old.shape[0], :old.shape[1]] = old
