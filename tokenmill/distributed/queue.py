"""The shard queue of a distributed job, in pure Python (no Ray): which shard a free worker runs next.

A free worker gets, in order: a shard put back after its worker was lost, else the next new shard, else (once no
new shard is left, and only if its machine runs nothing else) a copy of the in-flight shard projected to finish
last, if a fresh copy would beat it. A machine may hold several workers (the driver's slots, ``machine_of``). The first
copy to commit wins and the others are cancelled. A shard whose attempts all died is given up after
``max_retries`` re-runs; the driver writes its rows to the error file.

The driver (``distributed/driver.py``) and the fleet simulator (``distributed/simulate.py``) share this code, so
the policy that is measured at 512 simulated workers is the one that runs.

Invariants: a shard is in exactly one of pending / running / committed / given up; a running shard has 1 or 2
attempts (the original and at most one copy), each on a different worker; a worker holds at most one attempt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


@dataclass
class Shard:
    shard_id: int
    work: float  # expected tokens (prompt + max_tokens): the unit of progress and projection
    num_rows: int
    attempts: int = 0  # attempts started (originals, retries and copies)
    retries: int = 0  # re-runs after a lost worker
    state: str = "pending"  # pending / running / committed / given_up


@dataclass
class Attempt:
    shard: Shard
    worker: str
    started: float
    is_copy: bool
    done_work: float = 0.0
    progress_at: float = 0.0  # when done_work was last reported

    def projected_finish(self, now: float, fleet_rate: float | None) -> float:
        """When this attempt should finish at the rate it has shown so far (work done over the time since it
        started, so a worker that stops reporting slows its own projection down). Before any progress: when the
        fleet's rate says; an attempt already past that is projected to need as long again as it has run."""
        elapsed = now - self.started
        if self.done_work > 0 and elapsed > 0:
            return now + max(0.0, self.shard.work - self.done_work) * elapsed / self.done_work
        if fleet_rate:
            expected = self.started + self.shard.work / fleet_rate
            return expected if expected > now else now + elapsed
        return float("inf")


@dataclass
class QueueStats:
    reissued: int = 0  # straggler copies started
    copies_won: int = 0  # shards committed by their copy rather than the original
    retried: int = 0  # shards put back after a lost worker
    given_up: int = 0
    workers_lost: int = 0


@dataclass
class ShardQueue:
    source: Iterator[Shard]  # new shards, read lazily
    max_retries: int = 3
    reissue: bool = True
    pending: deque = field(default_factory=deque)  # shards put back, run before new ones
    running: dict = field(default_factory=dict)  # worker -> Attempt
    stats: QueueStats = field(default_factory=QueueStats)
    committed_work: float = 0.0
    committed_seconds: float = 0.0  # worker-seconds of the attempts that committed
    source_exhausted: bool = False
    machine_of: Callable[[str], str] = lambda worker: worker  # slots of one machine never copy each other
    copies: dict = field(default_factory=dict)  # shard id -> attempts running (1 or 2)

    @property
    def fleet_rate(self) -> float | None:
        """Work per second of one worker, from the attempts that committed."""
        return self.committed_work / self.committed_seconds if self.committed_seconds > 0 else None

    def attempts_of(self, shard: Shard) -> list[Attempt]:
        return [a for a in self.running.values() if a.shard is shard]

    def assign(self, worker: str, now: float) -> Attempt | None:
        """The next attempt for a free ``worker``, or None (nothing it should do now)."""
        assert worker not in self.running, f"{worker} already runs a shard"
        shard = self.pending.popleft() if self.pending else self._next_new()
        is_copy = False
        if shard is None:
            shard = self._straggler(now, worker) if self.reissue else None
            if shard is None:
                return None
            is_copy = True
            self.stats.reissued += 1
        shard.state = "running"
        shard.attempts += 1
        attempt = Attempt(shard, worker, now, is_copy, progress_at=now)
        self.running[worker] = attempt
        self.copies[shard.shard_id] = self.copies.get(shard.shard_id, 0) + 1
        return attempt

    def _drop(self, worker: str) -> Attempt | None:
        a = self.running.pop(worker, None)
        if a is not None:
            left = self.copies[a.shard.shard_id] - 1
            if left:
                self.copies[a.shard.shard_id] = left
            else:
                del self.copies[a.shard.shard_id]
        return a

    def _next_new(self) -> Shard | None:
        if self.source_exhausted:
            return None
        shard = next(self.source, None)
        if shard is None:
            self.source_exhausted = True
        return shard

    def _straggler(self, now: float, worker: str) -> Shard | None:
        """The single-attempt shard projected to finish last, if a fresh copy at the fleet's rate would finish
        before it (with no rate known yet, any straggler qualifies); only for a machine (all of ``worker``'s slots)
        that runs nothing."""
        rate = self.fleet_rate
        machine = self.machine_of(worker)
        if any(self.machine_of(a.worker) == machine for a in self.running.values()):
            return None  # only a machine with nothing to do takes a copy
        best, best_finish = None, -1.0
        for a in self.running.values():
            if self.copies[a.shard.shard_id] > 1:
                continue
            finish = a.projected_finish(now, rate)
            if finish > best_finish:
                best, best_finish = a.shard, finish
        if best is None:
            return None
        if rate is not None and now + best.work / rate >= best_finish:
            return None
        return best

    def progress(self, worker: str, done_work: float, now: float) -> None:
        a = self.running.get(worker)
        if a is not None and done_work > a.done_work:
            a.done_work, a.progress_at = done_work, now

    def committed(self, worker: str, now: float) -> list[str]:
        """``worker``'s attempt committed its shard; returns the workers running other copies (to cancel)."""
        a = self._drop(worker)
        shard = a.shard
        shard.state = "committed"
        self.committed_work += shard.work
        self.committed_seconds += max(now - a.started, 1e-9)
        if a.is_copy:
            self.stats.copies_won += 1
        losers = [w for w, other in self.running.items() if other.shard is shard] if shard.shard_id in self.copies \
            else []
        for w in losers:
            self._drop(w)
        return losers

    def cancelled(self, worker: str) -> None:
        """``worker`` stopped a copy whose shard another worker committed (or the driver dropped it)."""
        self._drop(worker)

    def lost(self, worker: str, count: bool = True) -> Shard | None:
        """``worker`` died (process killed, node lost). Its shard goes back to the queue unless another copy still
        runs; returns the shard if it was given up (more than ``max_retries`` re-runs), else None. ``count``: add
        one to ``workers_lost`` (False for the other slots of a worker already counted)."""
        self.stats.workers_lost += count
        a = self._drop(worker)
        if a is None:
            return None
        shard = a.shard
        if shard.state != "running" or shard.shard_id in self.copies:
            return None
        if shard.retries >= self.max_retries:
            shard.state = "given_up"
            self.stats.given_up += 1
            return shard
        shard.retries += 1
        shard.state = "pending"
        self.stats.retried += 1
        self.pending.append(shard)
        return None

    @property
    def finished(self) -> bool:
        if self.pending or self.running:
            return False
        if not self.source_exhausted:
            shard = next(self.source, None)
            if shard is None:
                self.source_exhausted = True
            else:
                self.pending.appendleft(shard)
                return False
        return True
