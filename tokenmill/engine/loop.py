"""EngineLoop: the one loop that drives an engine for every caller (``LLM.generate``, ``tokenmill run``, a Ray
worker's shards, the server's engine thread).

Requests reach the engine two ways:
- **feeds** (``open_feed``): an iterator of ``Submission`` per source (a job's rows, a Ray shard, an ``LLM`` batch),
  admitted lazily, feed by feed in the order they were opened, while fewer than ``window`` requests are in hand
  (in the engine, or waiting on an identical request). A feed may sort each admission longest prompt first. A
  bounded window keeps a million-row job from queueing a million requests in the scheduler;
- ``add``: one request straight into the engine (the server's online and Batch API requests, which are bounded by
  the server's own queue).

Dedupe (a feed's ``dedupe``): a submission identical to one of the same feed in the engine (``dedupe_key``: same
prompt and sampling, greedy or with the same seed) is not computed again; it waits on that one and finishes with a
copy of its output under its own request id.

``step()`` admits, runs one engine step and returns the finished (submission, output) pairs, followers right after
their leader. The loop is single-threaded: the caller that owns the engine calls it (the Ray worker and the server
put their cross-thread inboxes in front of it).

What the loop holds of a request lives on its ``Submission`` (its engine id, the dedupe key it leads, the identical
submissions waiting on it); ``held`` maps engine ids to them, and a feed's ``in_engine`` is its share of ``held``.

Invariants: every submission admitted (or waiting on one admitted) is returned by ``step`` exactly once, or dropped
by ``abort`` / ``close_feed`` / ``close_all``; a feed's followers never outlive their leader (a dropped leader takes
them with it, and they share its feed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from tokenmill.core.priority import ONLINE
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


def dedupe_key(token_ids, params: SamplingParams) -> tuple | None:
    """Two requests with equal keys give equal outputs: same prompt and the same sampling, greedy (seed and top-k/p
    are then irrelevant) or with the same seed. None for requests that sample freely (each copy must differ)."""
    if params.greedy:
        params = replace(params, seed=None, top_k=0, top_p=1.0, temperature=0.0)
    elif params.seed is None:
        return None
    return tuple(token_ids), params


@dataclass(eq=False)
class Submission:
    """One request as a caller hands it to the loop. ``request_id``: unique within its feed (the loop gives the
    engine ``<feed>/<request_id>``; outputs come back under ``request_id``); ``payload``: the caller's object,
    handed back with the output (a job's prepared row, a server stream); ``feed``: the feed it came from ("" for
    ``add``)."""
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    payload: Any = None
    priority: int = ONLINE
    feed: str = ""
    # set by the loop (its per-request record is the submission itself):
    engine_id: str = ""  # the id the engine knows it by
    follows: str = ""  # the engine id of the identical request this one waits on (dedupe)
    key: tuple | None = None  # while it leads: its (feed, dedupe key)
    followers: list["Submission"] = field(default_factory=list)  # while it leads: the identical ones waiting on it


@dataclass(eq=False)
class Feed:
    """A source of submissions and what the loop holds of it."""
    name: str
    items: Iterator[Submission]
    sort_by_length: bool = False
    dedupe: bool = True
    exhausted: bool = False
    in_engine: dict[str, Submission] = field(default_factory=dict)  # engine id -> the submission computed

    @property
    def done(self) -> bool:
        """Every submission read and finished (or dropped)."""
        return self.exhausted and not self.in_engine


@dataclass
class LoopStep:
    """What one ``step`` did: the finished pairs, and the engine's own result when deltas were asked for (the
    server streams each new token)."""
    finished: list[tuple[Submission, RequestOutput]]
    deltas: Any = None  # the engine's StepResult, with step(deltas=True)


class EngineLoop:
    def __init__(self, engine, window: int | None = None) -> None:
        """``engine``: an LLMEngine or anything with its request API (the server's ``ServedEngine``);
        ``window``: requests in hand at most (default ``2 * max_num_seqs + 64``: a full batch, another one waiting
        to replace it, and slack for requests that finish in the same step)."""
        self.engine = engine
        self.window = window or 2 * engine.config.max_num_seqs + 64
        self.feeds: dict[str, Feed] = {}  # in the order they were opened
        self.held: dict[str, Submission] = {}  # engine id -> the submission computed under it (feeds' and add()'s)
        self._leader: dict[tuple, str] = {}  # (feed, dedupe key) -> the engine id computing it
        self.num_followers = 0  # waiting now
        self.num_deduplicated = 0  # ever

    # ---------------------------------------------------------------- handing work in
    def open_feed(self, name: str, items: Iterable[Submission], sort_by_length: bool = False,
                  dedupe: bool = True) -> Feed:
        if name in self.feeds or name == "":
            raise ValueError(f"a feed named {name!r} is already open (or the name is empty)")
        feed = self.feeds[name] = Feed(name, iter(items), sort_by_length, dedupe)
        return feed

    def add(self, sub: Submission) -> None:
        """``sub`` straight into the engine under its own id (no window, no dedupe); the engine's ValueError for a
        bad request."""
        sub.feed, sub.engine_id = "", sub.request_id
        self.engine.add_request(sub.request_id, sub.token_ids, sub.params, sub.priority)
        self.held[sub.request_id] = sub

    @property
    def num_held(self) -> int:
        """Requests in hand: in the engine (each sample of one with n > 1 counts) or waiting on an identical one."""
        return self.engine.num_unfinished_requests + self.num_followers

    @property
    def busy(self) -> bool:
        """Something is in the engine or some feed may still have submissions."""
        return self.engine.has_unfinished_requests() or any(not f.exhausted for f in self.feeds.values())

    # ---------------------------------------------------------------- the loop
    def step(self, deltas: bool = False) -> LoopStep:
        """Admits from the feeds, runs one engine step (none when nothing is in the engine) and returns what
        finished. Feeds that are done are closed."""
        self._admit()
        if not self.engine.has_unfinished_requests():
            self._drop_done_feeds()
            return LoopStep([])
        result = None
        if deltas:
            result = self.engine.step_with_deltas()
            outs = result.finished
        else:
            outs = self.engine.step()
        finished = []
        for out in outs:
            rid = out.request_id
            sub = self.held.pop(rid, None)
            if sub is None:  # a request the loop does not own (dropped meanwhile)
                continue
            if sub.feed:
                self.feeds[sub.feed].in_engine.pop(rid)
            out.request_id = sub.request_id
            finished.append((sub, out))
            for twin in self._release(sub):
                finished.append((twin, replace(out, request_id=twin.request_id)))
        self._drop_done_feeds()
        return LoopStep(finished, result)

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable[[], None] = lambda: None) -> Iterator[tuple[Submission, RequestOutput]]:
        """Steps until nothing is left or ``should_stop()`` (checked before each step); ``on_step()`` after each."""
        while not should_stop() and self.busy:
            yield from self.step().finished
            on_step()

    # ---------------------------------------------------------------- dropping work
    def abort(self, request_ids: list[str]) -> None:
        """Drops requests added with ``add`` (by their ids); nothing is returned for them."""
        ids = [rid for rid in request_ids if rid in self.held and not self.held[rid].feed]
        for rid in ids:
            del self.held[rid]
        if ids:
            self.engine.abort_request(ids)

    def close_feed(self, name: str) -> tuple[int, int]:
        """Drops a feed and every request of it still in hand; returns (requests dropped from the engine, rows
        waiting on them)."""
        feed = self.feeds.pop(name, None)
        if feed is None:
            return 0, 0
        followers = 0
        if feed.in_engine:
            self.engine.abort_request(list(feed.in_engine))
            for rid, sub in feed.in_engine.items():
                del self.held[rid]
                followers += len(self._release(sub))
        return len(feed.in_engine), followers

    def close_all(self) -> None:
        """Drops everything in hand (an engine fault, a stop)."""
        for name in list(self.feeds):
            self.close_feed(name)
        if self.held:  # what add() put in
            self.engine.abort_request(list(self.held))
            self.held.clear()

    # ---------------------------------------------------------------- internals
    def _admit(self) -> None:
        for feed in list(self.feeds.values()):
            if feed.exhausted:
                continue
            batch = []
            while self.num_held + len(batch) < self.window:
                sub = next(feed.items, None)
                if sub is None:
                    feed.exhausted = True
                    break
                batch.append(sub)
            if feed.sort_by_length:
                batch.sort(key=lambda s: -len(s.token_ids))
            for sub in batch:
                sub.feed = feed.name
                rid = sub.engine_id = f"{feed.name}/{sub.request_id}"
                if feed.dedupe and self._follow(sub, feed.name):
                    continue
                self.engine.add_request(rid, sub.token_ids, sub.params, sub.priority)
                feed.in_engine[rid] = self.held[rid] = sub
            if self.num_held >= self.window:
                return

    def _follow(self, sub: Submission, scope: str) -> bool:
        """True if ``sub`` now waits on an identical request of its feed; else, when it has a dedupe key, it becomes
        that key's leader (the caller then computes it)."""
        key = dedupe_key(sub.token_ids, sub.params)
        if key is None:
            return False
        key = (scope, key)
        leader = self._leader.get(key)
        if leader is not None:
            sub.follows = leader
            self.held[leader].followers.append(sub)
            self.num_followers += 1
            self.num_deduplicated += 1
            return True
        self._leader[key] = sub.engine_id
        sub.key = key
        return False

    def _release(self, sub: Submission) -> list[Submission]:
        """The submissions that waited on ``sub`` (finished or dropped); its key has no leader any more."""
        if sub.key is not None:
            del self._leader[sub.key]
            sub.key = None
        twins, sub.followers = sub.followers, []
        self.num_followers -= len(twins)
        return twins

    def _drop_done_feeds(self) -> None:
        for name in [n for n, f in self.feeds.items() if f.done]:
            del self.feeds[name]
