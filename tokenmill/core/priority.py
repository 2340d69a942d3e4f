"""Priority classes: online requests first, batch rows in what they leave (docs/BATCH_API.md).

A request's ``priority`` is ``ONLINE`` (0: a server's interactive requests, and every request of a job or of
``LLM``) or ``BATCH`` (1: the rows of a Batch API batch on a server). The scheduler keeps one FIFO per class
(``WaitingQueues``) and admits a batch row only

- after every waiting online request had its turn in the step (its running prefill chunks too), and
- while ``OnlineHeadroom`` blocks stay free after the row's reservation and ``OnlineHeadroom.seqs`` sequence slots
  stay open, so an online burst finds room at once without preempting a batch row.

The headroom follows the online load it has seen (deterministically, counted in scheduler steps, not seconds): it
is ``k`` online requests of the p95 reservation among the last ``WINDOW`` online admissions, with
``k = max(1, max_num_seqs // 4)`` while online requests were admitted within the last ``IDLE_STEPS`` steps
(``active``) and ``k = max(1, max_num_seqs // 16)`` after that (before any online request: the blocks of one
request of ``max_model_len``, and the same ``max_num_seqs // 16`` slots), so the first burst after a quiet spell
still finds sequence slots (without them it would wait for batch rows to finish: no preemption). Never more than
half the pool's blocks nor ``max_num_seqs - 1`` sequence slots, so a batch always progresses. With no batch rows
waiting it costs nothing: it only gates class 1.

Steps stay short beside online work: while online requests decode, or the headroom is ``active``, batch rows get at
most ``EngineConfig.batch_token_budget`` tokens of a step (decodes in turn, then prefill chunks and admissions), so
an online request that arrives waits for a short step; while an online request waits or prefills, batch rows get an
eighth of that, so its prompt runs in a step almost its own (time to first token close to an idle server's). Online
inter-token latency still grows with the batch rows decoding beside it (on a CPU a step's time follows its tokens):
a smaller ``batch_token_budget`` keeps it lower, at the batch's expense.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from tokenmill.core.request import Request

ONLINE = 0
BATCH = 1
PRIORITIES = (ONLINE, BATCH)


class WaitingQueues:
    """The waiting requests, one FIFO per priority class; iteration and ``len`` cover all classes, online first."""

    def __init__(self) -> None:
        self.queues: tuple[deque[Request], ...] = tuple(deque() for _ in PRIORITIES)

    def append(self, req: Request) -> None:
        self.queues[req.priority].append(req)

    def appendleft(self, req: Request) -> None:
        """A preempted request goes back to the head of its class."""
        self.queues[req.priority].appendleft(req)

    def remove(self, req: Request) -> None:
        self.queues[req.priority].remove(req)

    def __contains__(self, req: Request) -> bool:
        return req in self.queues[req.priority]

    def __len__(self) -> int:
        return sum(len(q) for q in self.queues)

    def __bool__(self) -> bool:
        return any(self.queues)

    def __iter__(self) -> Iterator[Request]:
        for q in self.queues:
            yield from q

    def count(self, priority: int) -> int:
        return len(self.queues[priority])


class OnlineHeadroom:
    """The blocks and sequence slots a batch row must leave free (see the module docstring)."""

    WINDOW = 64  # online admissions the p95 is taken over
    IDLE_STEPS = 512  # steps without an online admission after which the headroom shrinks to one request

    def __init__(self, num_blocks: int, block_size: int, max_num_seqs: int, max_model_len: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.default_blocks = -(-max_model_len // block_size)
        self.recent: deque[int] = deque(maxlen=self.WINDOW)  # blocks of the latest online reservations
        self.steps_since_online = self.IDLE_STEPS  # as if idle: no online request seen yet

    def observe(self, num_tokens: int) -> None:
        """An online request was admitted with a reservation of ``num_tokens`` token slots."""
        self.recent.append(-(-num_tokens // self.block_size))
        self.steps_since_online = 0

    def tick(self) -> None:
        self.steps_since_online += 1

    @property
    def active(self) -> bool:
        return self.steps_since_online < self.IDLE_STEPS

    @property
    def per_request_blocks(self) -> int:
        if not self.recent:
            return self.default_blocks
        ranked = sorted(self.recent)
        return ranked[min(len(ranked) - 1, (95 * len(ranked)) // 100)]

    @property
    def requests(self) -> int:
        return max(1, self.max_num_seqs // (4 if self.active else 16))

    @property
    def blocks(self) -> int:
        requests = self.requests if self.recent else 1  # none seen yet: one request of max_model_len
        return min(self.num_blocks // 2, requests * self.per_request_blocks)

    @property
    def seqs(self) -> int:
        return min(self.max_num_seqs - 1, self.requests)
