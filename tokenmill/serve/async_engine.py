"""The async front of the engine: one thread steps the engine while requests keep arriving from the event loop.

Requests come in through ``add`` (from the event loop; the waiting queue is bounded: past ``max_queued`` it raises
QueueFull, which the app turns into a 429) and each gets a ``RequestStream``: after every engine step the thread
puts the request's new token (and, when it ends, its final ``RequestOutput``) on the stream's asyncio queue.
``abort`` (a client that went away) finishes the request at the next step boundary and frees its KV blocks at once.

``max_wait_ms``: while fewer than ``max_num_seqs`` requests run and new ones keep arriving, wait at most this long
after the latest arrival before a step, to gather more into it (0: step at once).

A job on the server (a Batch API batch) hands its rows in from its own thread through ``submit``, at priority
``BATCH`` (core/priority.py: they fill what online requests leave); each finished output, not each token, goes on
the ``queue.Queue`` the job gave (``serve/engine_port.py``). Batch rows count neither in the waiting queue's bound
nor in the online metrics.

The engine is driven through ``engine/loop.EngineLoop`` like every other caller (requests ``add``-ed straight in;
the job behind a Batch API batch keeps its own loop's window and dedupe over ``ServedEngine``).

Invariants: every stream gets exactly one end event (a final output, or an error when the engine dies); the engine
is only touched by the engine thread (the event loop's 429 bound reads the online waiting count the engine thread
publishes under the lock).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tokenmill.core.priority import BATCH, ONLINE
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.loop import EngineLoop, Submission
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams
from tokenmill.serve.metrics import ServerMetrics

log = logging.getLogger("tokenmill")


class QueueFull(Exception):
    pass


class EngineDead(Exception):
    pass


@dataclass
class StreamEvent:
    token_ids: list[int] = field(default_factory=list)
    index: int = 0  # the sample the tokens belong to (a request with n > 1)
    logprobs: list[dict[int, float]] | None = None  # the tokens' logprobs, for a request that asked for them
    output: RequestOutput | None = None  # set on the last event of a finished request
    error: str | None = None  # set when the engine died


class RequestStream:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self.arrival = time.monotonic()
        self.scheduled: float | None = None
        self.last_token: float | None = None

    def put(self, event: StreamEvent) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


def _deliver(items: list) -> None:
    for queue, event in items:
        queue.put_nowait(event)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, max_wait_ms: float = 0.0,
                 max_queued: int = 1024) -> None:
        self.engine = engine
        self.loop = EngineLoop(engine)  # requests go straight in (add): the server bounds its own queue
        self.metrics = metrics
        self.max_wait = max_wait_ms / 1000.0
        self.max_queued = max_queued
        self.dead: str | None = None
        self._cv = threading.Condition()
        self._pending: list[tuple[str, list[int], SamplingParams, int]] = []  # ..., priority
        self._aborts: list[str] = []
        self._streams: dict[str, RequestStream] = {}
        self._sinks: dict[str, queue.Queue] = {}  # submitted batch rows: where their outputs go
        self._last_arrival = 0.0
        self._engine_waiting = 0  # online requests in the engine not admitted yet, as the engine thread last saw
        self._stopping = False
        self.load: dict = {}  # the engine's load, published by the engine thread (``_update_gauges``)
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- event-loop side
    def add(self, request_id: str, token_ids: list[int], params: SamplingParams) -> RequestStream:
        stream = RequestStream(asyncio.get_running_loop())
        with self._cv:
            if self.dead is not None:
                raise EngineDead(self.dead)
            if self.num_waiting >= self.max_queued:
                raise QueueFull()
            self._streams[request_id] = stream
            self._pending.append((request_id, token_ids, params, ONLINE))
            self._last_arrival = time.monotonic()
            self._cv.notify()
        return stream

    def submit(self, request_id: str, token_ids: list[int], params: SamplingParams, sink: queue.Queue) -> None:
        """From a job's thread: queues a batch row; its ``RequestOutput`` goes on ``sink`` when it finishes (an
        ``EngineDead`` instead, if the engine dies first). No bound here: the job keeps its own window."""
        with self._cv:
            if self.dead is not None:
                raise EngineDead(self.dead)
            self._sinks[request_id] = sink
            self._pending.append((request_id, token_ids, params, BATCH))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        with self._cv:
            if request_id in self._streams or request_id in self._sinks:
                self._aborts.append(request_id)
                self._cv.notify()

    def shutdown(self, abort_all: bool = True) -> None:
        with self._cv:
            if abort_all:
                self._aborts.extend(self._streams)
                self._aborts.extend(self._sinks)
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=60)

    @property
    def num_waiting(self) -> int:
        """Online requests not admitted yet (batch rows wait at their own priority and count here not at all):
        those handed in and not taken yet, and those the engine thread last counted in the engine (the caller holds
        ``_cv``; the engine itself is never read here)."""
        return sum(p[3] == ONLINE for p in self._pending) + self._engine_waiting

    # ---------------------------------------------------------------- engine thread
    def _take_work(self) -> tuple[list, list[str]] | None:
        """Waits for something to do; returns (new requests, aborts), or None to stop."""
        with self._cv:
            while not (self._pending or self._aborts or self.engine.has_unfinished_requests() or self._stopping):
                self._cv.wait()
            if self._stopping and not self._pending and not self._aborts and not self.engine.has_unfinished_requests():
                return None
            if self.max_wait and self._pending:
                # gather: more may be on the way; stop waiting once a step would be full
                while (len(self._pending) + self.engine.num_running_requests < self.engine.config.max_num_seqs
                       and not self._stopping):
                    left = self._last_arrival + self.max_wait - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            new, self._pending = self._pending, []
            aborts, self._aborts = self._aborts, []
            self._engine_waiting += sum(p[3] == ONLINE for p in new)  # in the engine from now on
        return new, aborts

    def _run(self) -> None:
        try:
            self._update_gauges()
            while (work := self._take_work()) is not None:
                new, aborts = work
                aborted = set(aborts)
                for rid, ids, params, priority in new:
                    if rid not in aborted:
                        self.loop.add(Submission(rid, ids, params, priority=priority))
                if aborts:
                    self.loop.abort(aborts)
                    for rid in aborts:
                        stream = self._pop(rid)
                        if stream is not None:
                            self.metrics.success.labels(self.metrics.model_name, "abort").inc()
                        with self._cv:
                            self._sinks.pop(rid, None)
                if self.loop.busy:
                    self._step()
                self._update_gauges()
        except Exception as e:  # the engine is broken: every stream ends with the error, /health turns 503
            log.exception("the engine loop failed")
            with self._cv:
                self.dead = f"{type(e).__name__}: {e}"
                streams, self._streams = self._streams, {}
                sinks, self._sinks = self._sinks, {}
            for stream in streams.values():
                stream.put(StreamEvent(error=self.dead))
            for sink in sinks.values():
                sink.put(EngineDead(self.dead))

    def _pop(self, rid: str) -> RequestStream | None:
        with self._cv:
            return self._streams.pop(rid, None)

    def _step(self) -> None:
        m, name = self.metrics, self.metrics.model_name
        st = self.engine.stats
        before_prompt, before_pre = self.engine.num_prompt_tokens_done, st.num_preemptions
        before_q, before_h = st.prefix_cache_queries, st.prefix_cache_hits
        step = self.loop.step(deltas=True)
        result = step.deltas
        now = time.monotonic()
        m.iteration_tokens.labels(name).observe(result.num_scheduled_tokens)
        m.prompt_tokens.labels(name).inc(self.engine.num_prompt_tokens_done - before_prompt)
        m.generation_tokens.labels(name).inc(len(result.new_token_ids))
        m.preemptions.labels(name).inc(st.num_preemptions - before_pre)
        m.prefix_queries.labels(name).inc(st.prefix_cache_queries - before_q)
        m.prefix_hits.labels(name).inc(st.prefix_cache_hits - before_h)
        with self._cv:
            streams = dict(self._streams)
        parent_of = self.engine.parent_of  # a request with n > 1 runs as samples with ids of their own
        for rid in result.scheduled_ids:
            s = streams.get(parent_of(rid)[0])
            if s is not None and s.scheduled is None:
                s.scheduled = now
                m.queue_time.labels(name).observe(now - s.arrival)
        finished = {out.request_id: out for _, out in step.finished}
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}  # one wake-up of each event loop per step
        stepped: set[str] = set()
        for rid, token in result.new_token_ids.items():
            parent, index = parent_of(rid)
            s = streams.get(parent)
            if s is None:
                continue
            if parent not in stepped:  # one TTFT / inter-token gap per request and step, whatever its n
                stepped.add(parent)
                if s.last_token is None:
                    m.ttft.labels(name).observe(now - s.arrival)
                else:
                    m.itl.labels(name).observe(now - s.last_token)
                s.last_token = now
            if parent not in finished:  # a finished request's texts come whole with its output
                lp = result.new_logprobs.get(rid)
                event = StreamEvent([token], index, [lp] if lp is not None else None)
                deliveries.setdefault(s.loop, []).append((s.queue, event))
        for rid, out in finished.items():
            s = self._pop(rid)
            if s is None:
                with self._cv:
                    sink = self._sinks.pop(rid, None)
                if sink is not None:
                    sink.put(out)
                continue
            m.e2e.labels(name).observe(now - s.arrival)
            m.success.labels(name, out.finish_reason).inc()
            last = [out.token_ids[-1]] if rid in result.new_token_ids and out.token_ids else []
            deliveries.setdefault(s.loop, []).append((s.queue, StreamEvent(last, output=out)))
        for loop, items in deliveries.items():
            loop.call_soon_threadsafe(_deliver, items)

    def _update_gauges(self) -> None:
        """On the engine thread, after each step: the gauges, and ``load`` (one new dict each time, so a reader on
        another thread sees one consistent snapshot without touching the engine)."""
        m, name, e = self.metrics, self.metrics.model_name, self.engine
        with self._cv:
            self._engine_waiting = e.num_waiting_at(ONLINE)
            waiting = self.num_waiting
        running, kv = e.num_running_requests, e.kv_cache_usage
        m.running.labels(name).set(running)
        m.waiting.labels(name).set(waiting)
        m.kv_usage.labels(name).set(kv)
        with self._cv:
            batch_rows = len(self._sinks)
        self.load = {"running": running, "waiting": waiting, "batch_rows": batch_rows, "kv_usage": kv,
                     "prompt_tokens": e.num_prompt_tokens_done, "generation_tokens": e.num_generated_tokens,
                     "updated_at": time.time()}
