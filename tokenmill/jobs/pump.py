"""The engine loop of a generation job, as a library: prepared requests in, (request, output) pairs out.

``RequestPump`` keeps at most ``window`` requests in the engine (admitting more as earlier ones finish, longest
prompts first within an admission when the engine sorts by length) and yields each finished request with its
output. It neither prints nor writes files nor installs signal handlers: ``tokenmill run`` writes the results to
OUTPUT, a Ray worker to its shard file. ``stop()`` between two steps ends the stream; ``abort()`` then drops what is
still in the engine (it runs again on resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.jobs.preprocess import Prepared
from tokenmill.outputs import RequestOutput


class RequestPump:
    def __init__(self, engine: LLMEngine, todo: Iterator[Prepared], window: int | None = None) -> None:
        self.engine = engine
        self.todo = iter(todo)
        self.window = window or 2 * engine.config.max_num_seqs + 64
        self.in_flight: dict[str, Prepared] = {}
        self.exhausted = False

    def run(self, should_stop: Callable[[], bool] = lambda: False,
            on_step: Callable[[], None] = lambda: None) -> Iterator[tuple[Prepared, RequestOutput]]:
        """Steps the engine until every request is done or ``should_stop()`` (checked before each step);
        ``on_step()`` after every step (a state file that must stay fresh through long generations)."""
        engine = self.engine
        while not should_stop():
            if not self.exhausted and engine.num_unfinished_requests < self.window:
                self._admit()
            if not engine.has_unfinished_requests():
                if self.exhausted:
                    return
                continue
            for out in engine.step():
                yield self.in_flight.pop(out.request_id), out
            on_step()

    def _admit(self) -> None:
        engine = self.engine
        batch = []
        self.exhausted = True
        for item in self.todo:
            batch.append(item)
            if len(batch) + engine.num_unfinished_requests >= self.window:
                self.exhausted = False
                break
        if engine.config.sort_by_length:
            batch.sort(key=lambda it: -len(it.token_ids))
        for item in batch:
            rid = f"L{item.request.line_no}"
            self.in_flight[rid] = item
            engine.add_request(rid, item.token_ids, item.params)

    def abort(self) -> tuple[int, int]:
        """Drops every request still in the engine; returns how many were (running, queued)."""
        running = self.engine.num_running_requests
        queued = len(self.in_flight) - running
        if self.in_flight:
            self.engine.abort_request(list(self.in_flight))
            self.in_flight.clear()
        return running, queued
