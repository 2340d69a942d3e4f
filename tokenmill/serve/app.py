"""The FastAPI app: routes, auth, errors, health, metrics. ``serve()`` runs it under uvicorn.

- The model loads in a background thread after the server starts, so ``/health`` answers 503 while it loads (and
  after the engine died), 200 when ready; the generation endpoints answer 503 until then.
- Every error is an OpenAI-shaped body: 400 for a bad request (never a 500), 401 without the API key, 429 with
  ``Retry-After`` when the waiting queue is full.
- SIGTERM (uvicorn's handler): stop accepting, give in-flight requests ``shutdown_timeout`` seconds, then abort the
  rest; the process exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from tokenmill.config import EngineConfig
from tokenmill.jobs.preprocess import Preprocessor
from tokenmill.jobs.records import CHAT_URL, COMPLETIONS_URL
from tokenmill.serve.async_engine import AsyncEngine, EngineDead, QueueFull
from tokenmill.serve.detokenizer import IncrementalDetokenizer
from tokenmill.serve.metrics import ServerMetrics
from tokenmill.serve.protocol import (
    ApiError,
    chunk,
    embedding_inputs,
    final_body,
    merged_body,
    parse_generations,
    StreamLogprobs,
    sse,
    usage_chunk,
)

log = logging.getLogger("tokenmill")


@dataclass
class ServeSettings:
    engine_options: dict = field(default_factory=dict)  # EngineConfig keys, model included
    served_model_name: str | None = None
    api_key: str | None = None
    max_wait_ms: float = 0.0
    max_queued_requests: int = 1024
    embedding_model: str | None = None  # a directory, "default", or None
    state_dir: str | None = None  # the Batch API's files and database (None: state_store.default_state_dir())
    gpu_hourly_rate: float | None = None  # USD per machine-hour: the live page's cost of each batch
    max_file_bytes: int = 10 << 30  # the largest upload to /v1/files
    max_batch_requests: int = 5_000_000  # the most lines a batch's input file may have


class ServerState:
    """What the routes need, filled in by the loader thread."""

    def __init__(self, settings: ServeSettings, store) -> None:
        self.settings = settings
        self.store = store  # the Batch API's files and batches (serve/state_store.py)
        self.batches = None  # the BatchRunner, once the engine runs (serve/batches.py)
        self.ready = False
        self.load_error: str | None = None
        self.engine: AsyncEngine | None = None
        self.pre: Preprocessor | None = None
        self.model_name = settings.served_model_name or "tokenmill"
        self.metrics: ServerMetrics | None = None
        self.embedder = None
        self.loras: frozenset[str] = frozenset()  # the LoRA adapters the engine loaded (requests name them as model)
        self.embedder_lock = threading.Lock()

    def load(self) -> None:
        from tokenmill.engine.llm_engine import LLMEngine

        try:
            engine = LLMEngine(EngineConfig.from_dict(self.settings.engine_options))
            p = engine.model_path
            self.model_name = self.settings.served_model_name or (p.stem if p.suffix == ".gguf" else p.name)
            self.loras = frozenset(n for n, _ in engine.config.lora_adapters)
            self.pre = Preprocessor(engine.tokenizer, engine.config.max_model_len, engine.model_config.vocab_size,
                                    {"max_tokens": engine.config.max_model_len}, grammars=engine.grammars,
                                    max_num_seqs=engine.config.max_num_seqs, loras=self.loras)
            if self.settings.embedding_model:
                from tokenmill.embed.embedder import Embedder

                em = self.settings.embedding_model
                self.embedder = Embedder(None if em == "default" else em)
            self.metrics = ServerMetrics(self.model_name)
            self.engine = AsyncEngine(engine, self.metrics, self.settings.max_wait_ms,
                                      self.settings.max_queued_requests)
            from tokenmill.serve.batches import BatchRunner

            self.batches = BatchRunner(self.store, self.engine, self.model_name,
                                       (self.embedder, self.embedder_lock) if self.embedder is not None else None)
            self.batches.start()  # unfinished batches of an earlier run resume first
            self.ready = True
            log.info("model %s ready (loaded in %.1f s)", self.model_name, engine.load_seconds)
        except Exception as e:  # a bad model path, an option that does not fit: /health says so
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("error: the model failed to load: %s", self.load_error)

    @property
    def model_names(self) -> set[str]:
        names = {self.model_name, *self.loras}  # a request's model may name a LoRA adapter (it runs with it)
        if self.embedder is not None:
            names.add(self.embedder.model_name)
        return names

    def require_ready(self) -> AsyncEngine:
        if self.load_error:
            raise ApiError(503, f"the model failed to load: {self.load_error}", "server_error")
        if not self.ready:
            raise ApiError(503, "the model is still loading", "server_error", headers={"Retry-After": "5"})
        if self.engine.dead:
            raise ApiError(503, f"the engine has stopped: {self.engine.dead}", "server_error")
        return self.engine


class ApiKeyMiddleware:
    """401 for a /v1/ or /api/ request without ``Authorization: Bearer KEY``. A plain ASGI middleware: Starlette's
    ``BaseHTTPMiddleware`` would pass every streamed chunk through an extra task and memory stream, which measured as
    most of the event loop's time per token at saturation."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(("/v1/", "/api/")):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
            if given != self.expected:
                e = ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", "authentication_error",
                             code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(settings: ServeSettings) -> FastAPI:
    from tokenmill.serve.batches_api import add_batch_routes
    from tokenmill.serve.files_api import add_file_routes
    from tokenmill.serve.page import add_page_routes, server_status
    from tokenmill.serve.state_store import StateStore, default_state_dir

    store = StateStore(Path(settings.state_dir) if settings.state_dir else default_state_dir())
    state = ServerState(settings, store)

    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="tokenmill-load", daemon=True).start()
        yield
        if state.batches is not None:  # the running batch stops between two steps; it resumes on the next start
            await asyncio.to_thread(state.batches.stop)
        if state.engine is not None:
            state.engine.shutdown(abort_all=True)

    app = FastAPI(title="tokenmill", lifespan=lifespan)
    app.state.tokenmill = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)

    add_file_routes(app, store, settings.max_file_bytes)
    add_batch_routes(app, store, lambda: state.batches, lambda: state.model_name,
                     settings.embedding_model is not None, settings.max_batch_requests)
    add_page_routes(app, lambda batch: server_status(state, batch, settings.gpu_hourly_rate))

    @app.get("/health")
    async def health():
        if state.ready and not state.engine.dead:
            return {"status": "ok"}
        status = "error" if (state.load_error or (state.engine and state.engine.dead)) else "loading"
        return JSONResponse({"status": status, "detail": state.load_error or (state.engine and state.engine.dead)},
                            status_code=503)

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response(b"", media_type=CONTENT_TYPE_LATEST)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        state.require_ready()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "tokenmill"}
                                           for n in sorted(state.model_names)]}

    async def json_body(request: Request):
        try:
            return await request.json()
        except Exception:  # not JSON, not UTF-8, empty
            raise ApiError(400, "the request body is not valid JSON") from None

    async def generate(request: Request, url: str):
        engine = state.require_ready()
        reqs = parse_generations(await json_body(request), url, state.pre, {state.model_name, *state.loras})
        streams = []
        try:
            for req in reqs:
                prepared = req.prepared
                streams.append(engine.add(req.request_id, prepared.token_ids, prepared.params))
        except QueueFull:
            for req in reqs[:len(streams)]:
                engine.abort(req.request_id)
            raise ApiError(429, "the server's waiting queue is full; retry later", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise ApiError(503, f"the engine has stopped: {e}", "server_error") from None
        if reqs[0].stream:
            return StreamingResponse(_stream(state, engine, reqs[0], streams[0]), media_type="text/event-stream")
        if len(reqs) == 1:
            return await _complete(state, engine, reqs[0], streams[0], request)
        bodies = await asyncio.gather(*(_complete(state, engine, r, st, request) for r, st in zip(reqs, streams)))
        if any(not isinstance(b, dict) for b in bodies):  # the client went away: every prompt was aborted
            for r in reqs:
                engine.abort(r.request_id)
            return Response(status_code=499)
        return merged_body(reqs, bodies)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, CHAT_URL)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, COMPLETIONS_URL)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        state.require_ready()
        if state.embedder is None:
            raise ApiError(400, "this server has no embedding model (start it with --embedding-model)",
                           code="model_not_found")
        body = await json_body(request)
        inputs = embedding_inputs(body)
        if body.get("model") is not None and body["model"] != state.embedder.model_name:
            raise ApiError(400, f"model {body['model']!r} is not this server's embedding model "
                                f"({state.embedder.model_name})", code="model_not_found", param="model")

        def run():
            with state.embedder_lock:
                texts = [x for x in inputs if isinstance(x, str)]
                toks = state.embedder.tokenize(texts) if texts else []
                it = iter(toks)
                ids = [next(it).token_ids if isinstance(x, str) else state.embedder.truncate_ids(x).token_ids
                       for x in inputs]
                return ids, state.embedder.forward_packed(ids).cpu().numpy()

        ids, vectors = await asyncio.get_running_loop().run_in_executor(None, run)
        fmt = body.get("encoding_format") or "float"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() if fmt == "base64"
                 else [float(x) for x in v]} for i, v in enumerate(vectors)]
        n = sum(len(t) for t in ids)
        return {"object": "list", "data": data, "model": state.embedder.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}

    return app


async def _complete(state: ServerState, engine: AsyncEngine, req, stream, request: Request):
    """A non-streamed request: wait for its end; a client that goes away aborts it."""
    try:
        while True:
            try:
                event = await asyncio.wait_for(stream.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.abort(req.request_id)
                    return Response(status_code=499)
                continue
            if event.error:
                raise ApiError(503, f"the engine has stopped: {event.error}", "server_error")
            if event.output is not None:
                return final_body(req, event.output, state.model_name, state.engine.engine.tokenizer)
    except asyncio.CancelledError:
        engine.abort(req.request_id)
        raise


async def _stream(state: ServerState, engine: AsyncEngine, req, stream):
    """Server-sent events: a first chunk (the role, for chat), text deltas, a final chunk with the finish reason,
    the usage chunk when asked, then [DONE]; with n > 1 each choice's chunks carry its index (its text deltas as its
    tokens come, every final chunk when the last sample ends). A client that disconnects cancels this generator:
    the request is aborted and its KV blocks freed."""
    name = state.model_name
    tokenizer = state.engine.engine.tokenizer
    detoks = [IncrementalDetokenizer(tokenizer, req.prepared.token_ids, req.prepared.params.stop)
              for _ in range(req.prepared.params.n)]
    owed = StreamLogprobs(req, tokenizer)
    done = False
    try:
        if req.is_chat:
            for i in range(len(detoks)):
                yield sse(chunk(req, name, "", first=True, index=i))
        while True:
            event = await stream.queue.get()
            if event.error:
                yield sse({"error": {"message": f"the engine has stopped: {event.error}", "type": "server_error"}})
                done = True
                return
            if event.output is None:
                text = detoks[event.index].add(event.token_ids)
                owed.add(event.index, event.token_ids, event.logprobs)
                if text:
                    yield sse(chunk(req, name, text, index=event.index, logprobs=owed.take(event.index)))
                continue
            out = event.output
            done = True
            for sample in out.outputs:  # the final text is cut at a stop string: take the rest from it
                rest = detoks[sample.index].finish(sample.text)
                lp = owed.take(sample.index, sample.token_ids, sample.logprobs)
                yield sse(chunk(req, name, rest or None, sample.finish_reason, index=sample.index, logprobs=lp))
            if req.include_usage:
                yield sse(usage_chunk(req, name, out))
            yield sse("[DONE]")
            return
    finally:
        if not done:
            engine.abort(req.request_id)


def serve(settings: ServeSettings, host: str, port: int, shutdown_timeout: float) -> int:
    import uvicorn

    config = uvicorn.Config(build_app(settings), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=shutdown_timeout, access_log=False)
    server = uvicorn.Server(config)
    log.info("serving on http://%s:%d (OpenAI API under /v1; the live page at /; /health, /metrics)", host, port)
    t0 = time.monotonic()
    # uvicorn handles SIGTERM (graceful shutdown), then re-raises it to the handler it found: make that one a no-op,
    # so a SIGTERM'd server exits 0 once its in-flight requests are done.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    log.info("stopped after %.0f s", time.monotonic() - t0)
    return 0


__all__ = ["ServeSettings", "build_app", "serve"]
