"""The server's engine as a job sees it: what the job's ``EngineLoop`` and the job runner call on an ``LLMEngine``,
answered by the ``AsyncEngine`` that owns the engine thread.

A Batch API batch runs through the same job runner as ``tokenmill run`` (``jobs/runner.py``), in a thread of its
own; the runner is built with a ``ServedEngine`` instead of loading a model. ``add_request`` hands a row to the
engine thread at priority ``BATCH`` (``core/priority.py``); ``step`` waits for finished rows instead of stepping
(the engine thread steps for everyone), and returns an empty list after ``poll_s`` so the caller can check its stop
flag. Token counts are this job's own (the engine's totals include online traffic). ``close`` leaves the engine to
the server.

Invariants: every request added is either returned by ``step`` exactly once or dropped by ``abort_request``; ids
are prefixed with ``prefix`` so two jobs (or a job and an HTTP request) never share one.
"""

from __future__ import annotations

import queue

from tokenmill.core.priority import BATCH
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.serve.async_engine import AsyncEngine, EngineDead


class ServedEngine:
    def __init__(self, served: AsyncEngine, prefix: str, poll_s: float = 0.2) -> None:
        self.served = served
        engine = served.engine
        self.config = engine.config
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self.model_path = engine.model_path
        self.model_config = engine.model_config
        self.grammars = engine.grammars
        self.device = engine.device
        self.dtype = engine.dtype
        self.prefix = prefix
        self.poll_s = poll_s
        self.load_seconds = 0.0
        self.kernel_build_seconds = 0.0
        self.num_prompt_tokens_done = 0  # this job's rows only
        self.num_generated_tokens = 0
        self._done: queue.Queue = queue.Queue()
        self._in_flight: set[str] = set()

    @property
    def stats(self):
        """The engine's own counters (shared with online traffic: the prefix cache and preemptions are the
        engine's)."""
        return self.served.engine.stats

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    priority: int = BATCH) -> None:
        """Hands a row to the engine thread, always at priority ``BATCH`` (``priority`` is the engine API's)."""
        self.served.submit(self.prefix + request_id, prompt_token_ids, sampling_params, self._done)
        self._in_flight.add(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._in_flight)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._in_flight)

    @property
    def num_running_requests(self) -> int:
        """Not known per job on the server; the rows handed in and not finished."""
        return len(self._in_flight)

    def step(self) -> list[RequestOutput]:
        """The rows that finished since the last call (waits up to ``poll_s`` for the first one). Raises
        ``EngineDead`` when the engine thread died."""
        try:
            items = [self._done.get(timeout=self.poll_s)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._done.get_nowait())
            except queue.Empty:
                break
        outs = []
        for item in items:
            if isinstance(item, EngineDead):
                raise item
            rid = item.request_id.removeprefix(self.prefix)
            if rid not in self._in_flight:  # aborted after it finished: dropped
                continue
            self._in_flight.discard(rid)
            item.request_id = rid
            self.num_prompt_tokens_done += item.num_prompt_tokens
            self.num_generated_tokens += item.num_generated_tokens
            outs.append(item)
        return outs

    def abort_request(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if rid in self._in_flight:
                self._in_flight.discard(rid)
                self.served.abort(self.prefix + rid)

    def close(self) -> None:
        """Drops this job's rows still in the engine; the engine itself stays the server's."""
        self.abort_request(list(self._in_flight))
