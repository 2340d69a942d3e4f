"""A fleet simulator for the scheduling policies of a distributed job, past what this machine can run.

Discrete events over simulated time: N workers, shards whose times (at a normal worker's speed) are drawn from a
measured distribution, one slow node in ``slow_every`` (``slow_factor`` times slower), spot preemptions at
``preempt_per_hour`` per worker (exponential gaps; a preempted worker loses its shard in flight and is back after
``restart_s``). Three policies:

- ``static``: the rows cut into N fixed partitions up front (``--partition``): each worker runs its own shards in
  order; after a preemption it resumes its partition from its durable results; the job ends with its slowest
  partition.
- ``queue``: the shard queue of ``--ray`` without straggler copies.
- ``queue+reissue``: the shard queue with straggler copies once it is empty (``--ray``'s default).

The two queue policies run the very ``ShardQueue`` the driver runs; progress reports are the work done so far
(elapsed time x the worker's speed), as a worker's ``progress()`` reports it. Dollars: the whole fleet is billed
until the job ends (a fleet is held for the job), at ``hourly_rate``.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from tokenmill.distributed.queue import Shard, ShardQueue

POLICIES = ("static", "queue", "queue+reissue")
TICK_S = 30.0  # how often idle workers look again for a straggler to copy (the driver polls every 0.5 s)


@dataclass
class SimResult:
    policy: str
    workers: int
    makespan_s: float
    cost: float
    reissued: int = 0
    copies_won: int = 0
    preemptions: int = 0


def simulate(policy: str, workers: int, shard_seconds: np.ndarray, *, slow_every: int = 50,
             slow_factor: float = 3.0, preempt_per_hour: float = 0.0, restart_s: float = 180.0,
             hourly_rate: float = 1.0, seed: int = 0) -> SimResult:
    """``shard_seconds``: each shard's time on a normal worker, in the order the job would cut them."""
    rng = np.random.default_rng(seed)
    speed = np.ones(workers)
    slow = rng.permutation(workers)[: workers // slow_every] if slow_every else []
    speed[slow] = 1.0 / slow_factor

    def next_preemption(now: float) -> float:
        return now + rng.exponential(3600.0 / preempt_per_hour) if preempt_per_hour > 0 else math.inf

    if policy == "static":
        return _static(workers, shard_seconds, speed, next_preemption, restart_s, hourly_rate)
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}")
    return _queue(policy, workers, shard_seconds, speed, next_preemption, restart_s, hourly_rate)


def _static(workers, shard_seconds, speed, next_preemption, restart_s, hourly_rate) -> SimResult:
    finish = np.zeros(workers)
    preemptions = 0
    for w in range(workers):
        now = 0.0
        preempt = next_preemption(now)
        for t in shard_seconds[w::workers]:  # round-robin partitions, as --partition deals rows
            need = t / speed[w]
            while now + need > preempt:  # lost the shard in flight: back after restart_s, run it again
                preemptions += 1
                now = preempt + restart_s
                preempt = next_preemption(now)
            now += need
        finish[w] = now
    makespan = float(finish.max())
    return SimResult("static", workers, makespan, workers * hourly_rate * makespan / 3600, preemptions=preemptions)


def _queue(policy, workers, shard_seconds, speed, next_preemption, restart_s, hourly_rate) -> SimResult:
    q = ShardQueue(iter([Shard(i, float(t), 1) for i, t in enumerate(shard_seconds)]), max_retries=10**9,
                   reissue=policy == "queue+reissue")
    events: list = []  # (time, seq, kind, worker, token)
    seq = 0

    def push(t, kind, w, token=None):
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, w, token))
        seq += 1

    up = [True] * workers
    token = [0] * workers  # the current attempt's token: an event with another token is stale
    for w in range(workers):
        push(next_preemption(0.0), "preempt", w)
    preemptions = 0
    now = 0.0
    tick_at = math.inf

    def start_idle():
        idle = [w for w in range(workers) if up[w] and f"w{w}" not in q.running]
        if not idle:
            return
        for other, a in q.running.items():  # progress reports: the work done so far
            q.progress(other, min(a.shard.work, (now - a.started) * speed[int(other[1:])]), now)
        for w in idle:
            a = q.assign(f"w{w}", now)
            if a is None:
                return  # the queue is unchanged: no other idle worker gets anything now either
            token[w] += 1
            push(now + a.shard.work / speed[w], "finish", w, token[w])

    start_idle()
    while not q.finished:
        if not events:
            raise RuntimeError("simulation stalled")
        now, _, kind, w, tok = heapq.heappop(events)
        name = f"w{w}"
        if kind == "finish":
            if tok != token[w] or name not in q.running:
                continue
            for loser in q.committed(name, now):
                token[int(loser[1:])] += 1  # its finish event is now stale: cancelled
        elif kind == "preempt":
            if up[w]:
                preemptions += 1
                up[w] = False
                token[w] += 1
                if name in q.running:
                    q.lost(name)
                push(now + restart_s, "back", w)
        elif kind == "back":
            up[w] = True
            push(next_preemption(now), "preempt", w)
        elif kind == "tick":
            tick_at = math.inf
        start_idle()
        if tick_at == math.inf and q.running and any(up[i] and f"w{i}" not in q.running for i in range(workers)):
            tick_at = now + TICK_S
            push(tick_at, "tick", -1)
    makespan = now
    return SimResult(policy, workers, makespan, workers * hourly_rate * makespan / 3600, q.stats.reissued,
                     q.stats.copies_won, preemptions)
