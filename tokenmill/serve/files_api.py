"""The OpenAI Files API on ``tokenmill serve`` (the first part of the Batch API): ``POST /v1/files`` (multipart:
``file`` and ``purpose="batch"``), ``GET /v1/files`` (``purpose``, ``after``, ``limit``, ``order``),
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content`` and ``DELETE /v1/files/{id}``, in the API's shapes, over the
server's StateStore (``state_store.py``). They answer while the model is still loading.

An upload is parsed by Starlette, which spools a file part to a temporary file past 1 MiB, then copied into the
store off the event loop: a multi-GB upload never sits in memory, and one that breaks off registers nothing.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from tokenmill.serve.protocol import ApiError, list_page
from tokenmill.serve.state_store import FILE_PURPOSES, FileInUse, StateStore


def _no_such_file(file_id: str) -> ApiError:
    return ApiError(404, f"No such File object: {file_id}", param="id")


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(400, f"the file is larger than this server's limit of {max_bytes:,} bytes (start it with a higher "
                         f"--max-file-mb)", param="file", code="file_too_large")


def add_file_routes(app: FastAPI, store: StateStore, max_bytes: int = 10 << 30) -> None:
    """``max_bytes``: the largest file an upload may carry (checked on Content-Length before the body is read, and
    on the file itself)."""

    @app.post("/v1/files")
    async def upload(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes + (1 << 20):  # (+ the form's fields)
            raise _too_large(max_bytes)
        try:
            form = await request.form()
        except Exception as e:  # not multipart, malformed, or broken off
            raise ApiError(400, f"the upload must be multipart/form-data with a file and a purpose ({e})") from None
        try:
            upload, purpose = form.get("file"), form.get("purpose")
            if not isinstance(upload, UploadFile):
                raise ApiError(400, "the upload has no file part: send multipart/form-data with file and purpose",
                               param="file")
            if purpose not in FILE_PURPOSES:
                raise ApiError(400, f"purpose must be one of {', '.join(FILE_PURPOSES)}, got "
                                    f"{str(purpose)[:40]!r}", param="purpose")
            if upload.size is not None and upload.size > max_bytes:
                raise _too_large(max_bytes)
            return await asyncio.to_thread(store.add_file, upload.file, upload.filename or "upload.jsonl", purpose)
        finally:
            await form.close()

    @app.get("/v1/files")
    async def list_files(purpose: str | None = None, after: str | None = None, limit: int = 10000,
                         order: str = "desc"):
        if not 1 <= limit <= 10000:
            raise ApiError(400, f"limit must be in [1, 10000], got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise ApiError(400, f"order must be asc or desc, got {order[:20]!r}", param="order")
        try:
            data, more = await asyncio.to_thread(store.list_files, purpose, after, limit, order)
        except KeyError:
            raise _no_such_file(str(after)) from None
        return list_page(data, more)

    @app.get("/v1/files/{file_id}")
    async def get_file(file_id: str):
        obj = await asyncio.to_thread(store.get_file, file_id)
        if obj is None:
            raise _no_such_file(file_id)
        return obj

    @app.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        obj = await asyncio.to_thread(store.get_file, file_id)
        if obj is None:
            raise _no_such_file(file_id)
        return FileResponse(store.file_path(file_id), media_type="application/octet-stream",
                            filename=obj["filename"])

    @app.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        try:
            gone = await asyncio.to_thread(store.delete_file, file_id)
        except FileInUse as e:
            raise ApiError(409, f"file {file_id} is the input of batch {e}, which has not finished; cancel it or wait",
                           param="id") from None
        if not gone:
            raise _no_such_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}
