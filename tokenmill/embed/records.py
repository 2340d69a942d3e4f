"""Embedding job lines -> EmbedRequests or JobErrors; vectors -> OpenAI Batch output records.

Input lines, detected per line:
- ``{"id": ..., "text": "..."}`` (``text`` may also be a list of token ids, used as given);
- OpenAI Batch lines ``{"custom_id", "method": "POST", "url": "/v1/embeddings", "body": {"input": ...,
  "encoding_format": "float" | "base64", "dimensions": N}}`` with one input per line (a string, a one-string list, or
  a list of token ids).

Ids are compared as strings in embedding jobs (the Parquet ``id`` column is a string), so ``1`` and ``"1"`` are the
same id and the later line is a ``duplicate_id`` error.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.jobs.records import JobError, check_id, decode_line, is_openai_line

EMBEDDINGS_URL = "/v1/embeddings"
ENCODING_FORMATS = ("float", "base64")


@dataclass
class EmbedRequest:
    line_no: int
    record_id: Any  # id (plain) or custom_id (OpenAI), as given
    kind: str  # "plain" or "openai"
    text: str | list[int]
    encoding_format: str = "float"
    dimensions: int | None = None  # OpenAI ``dimensions``: must equal the model's (no Matryoshka cut)
    model: str | None = None  # OpenAI ``body.model``, as given

    @property
    def id_key(self) -> str:
        return embed_id_key(self.record_id)


def embed_id_key(record_id: Any) -> str:
    return str(record_id)


def parse_embed_line(raw: bytes, line_no: int) -> EmbedRequest:
    """Parses and checks one non-blank line; raises JobError."""
    obj = decode_line(raw, line_no)
    if is_openai_line(obj):
        return _parse_openai(obj, line_no)
    rid = check_id(obj.get("id"), "id", line_no, openai=False)
    if "text" not in obj:
        raise JobError("missing_input", f"line {line_no}: has no text", rid)
    return EmbedRequest(line_no, rid, "plain", _check_text(obj["text"], "text", line_no, rid, False))


def _parse_openai(obj: dict, line_no: int) -> EmbedRequest:
    rid = check_id(obj.get("custom_id"), "custom_id", line_no, openai=True)
    method = obj.get("method", "POST")
    if method != "POST":
        raise JobError("unsupported_method", f"line {line_no}: method {method!r} is not supported; use POST", rid, True)
    if obj.get("url") != EMBEDDINGS_URL:
        raise JobError("unsupported_url", f"line {line_no}: url {obj.get('url')!r} is not supported by "
                       f"`tokenmill embed`; use {EMBEDDINGS_URL}", rid, True)
    body = obj.get("body")
    if not isinstance(body, dict):
        raise JobError("invalid_body", f"line {line_no}: body must be an object", rid, True)
    if "input" not in body:
        raise JobError("missing_input", f"line {line_no}: an embeddings body needs input", rid, True)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ENCODING_FORMATS:
        raise JobError("invalid_body", f"line {line_no}: encoding_format {fmt!r}; use float or base64", rid, True)
    inp = body["input"]
    if isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        if len(inp) != 1:
            raise JobError("unsupported_n", f"line {line_no}: input holds {len(inp)} texts; put one text per line",
                           rid, True)
        inp = inp[0]
    dims = body.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool) or dims < 1):
        raise JobError("invalid_body", f"line {line_no}: dimensions must be a positive integer", rid, True)
    model = body.get("model")
    return EmbedRequest(line_no, rid, "openai", _check_text(inp, "input", line_no, rid, True), fmt, dims,
                        model if isinstance(model, str) else None)


def _check_text(value: Any, name: str, line_no: int, rid: Any, openai: bool) -> str | list[int]:
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if not value:
            raise JobError("empty_text", f"line {line_no}: {name} is empty", rid, openai)
        return value
    if not isinstance(value, str):
        raise JobError("invalid_text", f"line {line_no}: {name} must be a string or a list of token ids, got "
                       f"{type(value).__name__}", rid, openai)
    if not value.strip():
        raise JobError("empty_text", f"line {line_no}: {name} is empty", rid, openai)
    return value


def openai_embedding_record(req: EmbedRequest, vector: np.ndarray, num_tokens: int, model_name: str) -> dict:
    """An OpenAI Batch output line whose body is a ``CreateEmbeddingResponse``."""
    digest = hashlib.sha256(str(req.record_id).encode()).hexdigest()
    if req.encoding_format == "base64":
        embedding: Any = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
    else:
        embedding = [float(x) for x in vector]
    body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
            "model": model_name, "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
    return {"id": f"batch_req_{digest[:32]}", "custom_id": req.record_id,
            "response": {"status_code": 200, "request_id": f"req_{digest[32:64]}", "body": body}, "error": None}
