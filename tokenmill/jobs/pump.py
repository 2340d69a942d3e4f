"""The engine loop of a generation job, as a library: prepared requests in, (request, output) pairs out.

``RequestPump`` keeps at most ``window`` requests in hand (in the engine, or waiting on an identical request) and
yields each finished request with its output. It neither prints nor writes files nor installs signal handlers:
``tokenmill run`` writes the results to OUTPUT, a Ray worker to its shard file. ``stop()`` between two steps ends the
stream; ``abort()`` then drops what is still in hand (it runs again on resume).

Deduplication: a request identical to one already in the engine (``ordering.dedupe_key``: same prompt and sampling,
greedy or with the same seed) is not computed again; it is yielded with the output of the first one when that
finishes. Requests in an admission are sorted longest prompt first when ``sort_by_length`` (default: the engine's
setting); a caller that already ordered them (dataset ordering) passes False.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.jobs.ordering import dedupe_key
from tokenmill.jobs.preprocess import Prepared
from tokenmill.outputs import RequestOutput


class Duplicates:
    """Requests identical to one in flight (``ordering.dedupe_key``) wait on it instead of being computed again.
    ``scope`` narrows "identical" (a Ray worker's shard: a shard cancelled with its leaders takes their followers
    with it). Invariant: a held follower is handed back exactly once, by ``finished`` of its leader, or dropped by
    ``clear``."""

    def __init__(self) -> None:
        self._leader: dict[tuple, str] = {}  # (scope, dedupe key) -> the request id in flight
        self._key_of: dict[str, tuple] = {}
        self._followers: dict[str, list[Prepared]] = {}  # request id -> identical requests waiting on its output
        self.num_followers = 0  # held now
        self.num_deduplicated = 0  # ever

    def follow(self, item: Prepared, rid: str, scope: str = "") -> bool:
        """True if ``item`` now waits on an identical request in flight; else, when it has a dedupe key, it becomes
        that key's leader under ``rid`` (the caller then computes it)."""
        key = dedupe_key(item.token_ids, item.params)
        if key is None:
            return False
        key = (scope, key)
        leader = self._leader.get(key)
        if leader is not None:
            self._followers.setdefault(leader, []).append(item)
            self.num_followers += 1
            self.num_deduplicated += 1
            return True
        self._leader[key] = rid
        self._key_of[rid] = key
        return False

    def finished(self, rid: str) -> list[Prepared]:
        """The requests that waited on ``rid`` (finished or dropped); its key has no leader any more."""
        key = self._key_of.pop(rid, None)
        if key is not None:
            del self._leader[key]
        items = self._followers.pop(rid, [])
        self.num_followers -= len(items)
        return items

    def clear(self) -> None:
        self._leader.clear()
        self._key_of.clear()
        self._followers.clear()
        self.num_followers = 0


class RequestPump:
    def __init__(self, engine: LLMEngine, todo: Iterator[Prepared], window: int | None = None,
                 sort_by_length: bool | None = None, dedupe: bool = True) -> None:
        self.engine = engine
        self.todo = iter(todo)
        self.window = window or 2 * engine.config.max_num_seqs + 64
        self.sort_by_length = engine.config.sort_by_length if sort_by_length is None else sort_by_length
        self.dedupe = dedupe
        self.in_flight: dict[str, Prepared] = {}  # request id -> the request the engine computes
        self.duplicates = Duplicates()
        self.exhausted = False

    @property
    def num_held(self) -> int:
        return self.engine.num_unfinished_requests + self.duplicates.num_followers

    @property
    def num_deduplicated(self) -> int:
        return self.duplicates.num_deduplicated

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable[[], None] = lambda: None) -> Iterator[tuple[Prepared, RequestOutput]]:
        """Steps the engine until every request is done or ``should_stop()`` (checked before each step);
        ``on_step()`` after every step (a state file that must stay fresh through long generations)."""
        engine = self.engine
        while not should_stop():
            if not self.exhausted and self.num_held < self.window:
                self._admit()
            if not engine.has_unfinished_requests():
                if self.exhausted:
                    return
                continue
            for out in engine.step():
                rid = out.request_id
                yield self.in_flight.pop(rid), out
                for item in self.duplicates.finished(rid):
                    yield item, out
            on_step()

    def _admit(self) -> None:
        engine = self.engine
        batch = []
        self.exhausted = True
        for item in self.todo:
            batch.append(item)
            if len(batch) + self.num_held >= self.window:
                self.exhausted = False
                break
        if self.sort_by_length:
            batch.sort(key=lambda it: -len(it.token_ids))
        for item in batch:
            rid = f"L{item.request.line_no}"
            if self.dedupe and self.duplicates.follow(item, rid):
                continue
            self.in_flight[rid] = item
            engine.add_request(rid, item.token_ids, item.params)

    def abort(self) -> tuple[int, int]:
        """Drops every request still in hand; returns how many were (running, queued or waiting on a duplicate)."""
        running = self.engine.num_running_requests
        queued = max(0, len(self.in_flight) - running) + self.duplicates.num_followers  # (running counts samples)
        if self.in_flight:
            self.engine.abort_request(list(self.in_flight))
        self.in_flight.clear()
        self.duplicates.clear()
        return running, queued
