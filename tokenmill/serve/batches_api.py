"""The OpenAI Batch API's routes on ``tokenmill serve``: ``POST /v1/batches``, ``GET /v1/batches/{id}``,
``GET /v1/batches`` (``after``, ``limit``) and ``POST /v1/batches/{id}/cancel``, in the API's shapes, over the
server's StateStore; ``serve/batches.py`` runs them. They answer while the model is still loading (a batch created
then waits in ``validating``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi import FastAPI, Request

from tokenmill.serve.batches import BatchRunner
from tokenmill.serve.protocol import ApiError, list_page
from tokenmill.serve.state_store import BATCH_ENDPOINTS, COMPLETION_WINDOW_S, StateStore, with_live_counts

MAX_METADATA = 16  # pairs, as OpenAI's: keys up to 64 characters, values up to 512


def _no_such_batch(batch_id: str) -> ApiError:
    return ApiError(404, f"No such Batch object: {batch_id}", param="id")


def count_lines(path, limit: int) -> int:
    """The lines of a file (a last line without a newline counts), read in pieces; stops counting past ``limit``."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while n <= limit and (piece := f.read(1 << 20)):
            n += piece.count(b"\n")
            last = piece[-1:]
    return n + (last != b"\n")


def check_batch_body(body, store: StateStore, embeddings: bool = True,
                     max_requests: int = 5_000_000) -> tuple[str, str, str, dict | None]:
    """(input_file_id, endpoint, completion_window, metadata) of a create request, or a 400 naming the field.
    ``embeddings``: whether the server has an embedding model; ``max_requests``: the most lines the file may have."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise ApiError(400, "input_file_id is required: the id of an uploaded file with purpose batch",
                       param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in BATCH_ENDPOINTS:
        raise ApiError(400, f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, got {str(endpoint)[:60]!r}",
                       param="endpoint")
    if endpoint == "/v1/embeddings" and not embeddings:
        raise ApiError(400, "this server has no embedding model for /v1/embeddings batches (start it with "
                            "--embedding-model)", param="endpoint")
    window = body.get("completion_window")
    if window not in COMPLETION_WINDOW_S:
        raise ApiError(400, f"completion_window must be one of {', '.join(COMPLETION_WINDOW_S)}, got "
                            f"{str(window)[:20]!r}", param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None:
        ok = (isinstance(metadata, dict) and len(metadata) <= MAX_METADATA
              and all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                      for k, v in metadata.items()))
        if not ok:
            raise ApiError(400, f"metadata must be an object of at most {MAX_METADATA} string pairs (keys up to 64 "
                                f"characters, values up to 512)", param="metadata")
    extra = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
    if extra:
        raise ApiError(400, f"unknown field {sorted(extra)[0]!r}", param=sorted(extra)[0])
    f = store.get_file(file_id)
    if f is None:
        raise ApiError(400, f"input_file_id {file_id!r}: no such file", param="input_file_id")
    if f["purpose"] != "batch":
        raise ApiError(400, f"input_file_id {file_id!r} has purpose {f['purpose']!r}; a batch reads a file uploaded "
                            f"with purpose batch", param="input_file_id")
    lines = count_lines(store.file_path(file_id), max_requests)
    if lines > max_requests:
        raise ApiError(400, f"input_file_id {file_id!r} has more than {max_requests:,} lines; a batch takes at most "
                            f"{max_requests:,} requests (split the file, or start the server with a higher "
                            f"--max-batch-requests)", param="input_file_id", code="too_many_requests")
    return file_id, endpoint, window, metadata or None


def add_batch_routes(app: FastAPI, store: StateStore, runner: Callable[[], BatchRunner | None],
                     model_name: Callable[[], str], embeddings: bool = False, max_requests: int = 5_000_000) -> None:
    """``runner()``: the server's BatchRunner once the model is loaded, else None; ``embeddings``: whether the server
    has an embedding model (``/v1/embeddings`` batches run on it)."""

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        try:
            body = await request.json()
        except Exception:
            raise ApiError(400, "the request body is not valid JSON") from None
        file_id, endpoint, window, metadata = await asyncio.to_thread(check_batch_body, body, store, embeddings,
                                                                      max_requests)
        batch = await asyncio.to_thread(store.add_batch, file_id, endpoint, window, metadata, model_name())
        r = runner()
        if r is not None:
            r.wake()
        return batch

    @app.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str):
        batch = await asyncio.to_thread(store.get_batch, batch_id)
        if batch is None:
            raise _no_such_batch(batch_id)
        return with_live_counts(batch, await asyncio.to_thread(store.batch_state, batch_id))

    @app.get("/v1/batches")
    async def list_batches(after: str | None = None, limit: int = 20):
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be in [1, 100], got {limit}", param="limit")
        try:
            data, more = await asyncio.to_thread(store.list_batches, after, limit)
        except KeyError:
            raise _no_such_batch(str(after)) from None
        states = await asyncio.to_thread(lambda: [store.batch_state(b["id"]) for b in data])
        return list_page([with_live_counts(b, st) for b, st in zip(data, states)], more)

    @app.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str):
        batch = await asyncio.to_thread(store.get_batch, batch_id)
        if batch is None:
            raise _no_such_batch(batch_id)
        if batch["status"] not in ("validating", "in_progress", "cancelling"):
            raise ApiError(409, f"Cannot cancel a batch with status {batch['status']!r}.", code="batch_not_cancellable")
        r = runner()
        if r is not None:
            return await asyncio.to_thread(r.cancel, batch_id)
        # the model is still loading: the runner ends it as cancelled when it starts
        await asyncio.to_thread(store.set_batch_status, batch_id, "cancelling", ("validating", "in_progress"))
        return await asyncio.to_thread(store.get_batch, batch_id)
