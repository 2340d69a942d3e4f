"""Request checks and response bodies of the OpenAI-compatible endpoints.

A request body is checked exactly as an OpenAI Batch line of ``tokenmill run`` is (``jobs/records.py`` and
``jobs/preprocess.py``: the same sampling fields, the same unsupported-field rejections, the same context checks), so
a row that a job accepts is a request the server accepts, and the reverse. The server adds ``stream`` and
``stream_options`` and answers a rejection with HTTP 400 and an OpenAI-shaped error body.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass

from tokenmill.jobs.preprocess import Prepared, Preprocessor
from tokenmill.jobs.records import CHAT_URL, JobError
from tokenmill.jobs.results import choice_contents, openai_logprobs, result_record, vllm_prompt_logprobs


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def list_page(data: list[dict], has_more: bool) -> dict:
    """One page of a cursor-paginated listing (files, batches), in the OpenAI API's envelope."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


@dataclass
class GenerationRequest:
    prepared: Prepared
    stream: bool
    include_usage: bool
    request_id: str
    created: int
    index: int = 0  # the choice's index: the prompt's place in a list of prompts

    @property
    def is_chat(self) -> bool:
        return self.prepared.request.kind == "openai_chat"


_LINE_PREFIX = re.compile(r"^line 0:? ")


def prompt_list(body) -> list | None:
    """A completions body's ``prompt`` when it holds several prompts (strings, or lists of token ids), else None
    (one string, or one list of token ids)."""
    p = body.get("prompt") if isinstance(body, dict) else None
    if isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x
                                                                  and all(isinstance(t, int) for t in x)) for x in p):
        return p
    return None


def parse_generations(body, url: str, pre: Preprocessor, model_names: set[str]) -> list[GenerationRequest]:
    """A chat or completions body -> one prepared request per prompt (completions take a list of prompts: one choice
    each, in order); raises ApiError (400)."""
    prompts = prompt_list(body) if url != CHAT_URL else None
    if prompts is None:
        return [parse_generation(body, url, pre, model_names)]
    if body.get("stream"):
        raise ApiError(400, "a list of prompts cannot be streamed; send one prompt per request, or stream: false",
                       param="stream")
    reqs = [parse_generation({**body, "prompt": p}, url, pre, model_names) for p in prompts]
    for i, r in enumerate(reqs):
        r.index = i
        r.request_id = f"{reqs[0].request_id}-{i}" if i else reqs[0].request_id
    return reqs


def parse_generation(body, url: str, pre: Preprocessor, model_names: set[str]) -> GenerationRequest:
    """A chat or completions body -> the prepared request; raises ApiError (400)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    body = dict(body)
    model = body.get("model")
    if model is not None and model not in model_names:
        raise ApiError(400, f"model {json.dumps(model)[:60]} does not exist; this server serves "
                            f"{', '.join(sorted(model_names))}", code="model_not_found", param="model")
    stream = body.pop("stream", False)
    options = body.pop("stream_options", None)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", param="stream")
    if options is not None and (not isinstance(options, dict) or not stream
                                or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "stream_options must be an object like {\"include_usage\": true}, with stream: true",
                       param="stream_options")
    if stream and body.get("echo") is True:
        raise ApiError(400, "echo cannot be streamed yet; use stream: false", param="echo")
    kind = "chatcmpl" if url == CHAT_URL else "cmpl"
    request_id = f"{kind}-{uuid.uuid4().hex}"
    line = json.dumps({"custom_id": request_id, "method": "POST", "url": url, "body": body}).encode()
    [(_, item)] = pre.process([(0, line)])
    if isinstance(item, JobError):
        raise ApiError(400, _LINE_PREFIX.sub("", item.message), code=item.code)
    if stream and item.request.prompt_logprobs is not None:
        raise ApiError(400, "prompt_logprobs cannot be streamed yet; use stream: false", param="stream")
    if stream and item.params.num_samples > item.params.n:
        raise ApiError(400, "best_of > n cannot be streamed (the best samples are known only at the end); use "
                            "stream: false", param="stream")
    return GenerationRequest(item, stream, bool(options and options.get("include_usage")), request_id,
                             int(time.time()))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def final_body(req: GenerationRequest, out, model_name: str, tokenizer) -> dict:
    """The non-streamed response: the same body a `tokenmill run` OpenAI line gets (echo and logprobs included); a
    request run with a LoRA adapter names the adapter as its model."""
    model_name = req.prepared.params.lora or model_name
    choices, completion_tokens = choice_contents(req.prepared, out, tokenizer)
    record = result_record(req.prepared.request, choices, out.num_prompt_tokens, completion_tokens, model_name,
                           vllm_prompt_logprobs(req.prepared, out, tokenizer))
    body = record["response"]["body"]
    body["id"] = req.request_id
    body["created"] = req.created
    for choice in body["choices"]:  # a list of prompts: prompt p's n choices are p*n .. p*n + n-1, as OpenAI's
        choice["index"] += req.index * len(choices)
    return body


def merged_body(reqs: list[GenerationRequest], bodies: list[dict]) -> dict:
    """One completions response for a list of prompts: every prompt's choice, by index; the usage summed."""
    body = dict(bodies[0])
    body["choices"] = [c for b in bodies for c in b["choices"]]
    p = sum(b["usage"]["prompt_tokens"] for b in bodies)
    c = sum(b["usage"]["completion_tokens"] for b in bodies)
    body["usage"] = usage(p, c)
    body["id"] = reqs[0].request_id
    return body


def chunk(req: GenerationRequest, model_name: str, text: str | None, finish_reason: str | None = None,
          first: bool = False, index: int = 0, logprobs: dict | None = None) -> dict:
    """One streamed ``chat.completion.chunk`` / ``text_completion`` object, for choice ``index`` (``logprobs``: its
    tokens' since the previous chunk, in the shape of the non-streamed choice's)."""
    if req.is_chat:
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    model_name = req.prepared.params.lora or model_name
    return {"id": req.request_id, "object": obj, "created": req.created, "model": model_name, "choices": [choice]}


class StreamLogprobs:
    """The logprobs a stream owes each choice: its tokens' since the last chunk that carried them (sent with the next
    chunk that carries text, the rest with the final one); completions' ``text_offset`` counts from the start of
    the choice's text, as in the non-streamed body."""

    def __init__(self, req: GenerationRequest, tokenizer) -> None:
        self.k = req.prepared.params.logprobs
        self.kind, self.tokenizer = req.prepared.request.kind, tokenizer
        n = req.prepared.params.n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.steps: list[list[dict]] = [[] for _ in range(n)]
        self.sent, self.offset = [0] * n, [0] * n

    def add(self, index: int, token_ids: list[int], steps: list[dict] | None) -> None:
        if self.k is not None:
            self.ids[index] += token_ids
            self.steps[index] += steps or [{} for _ in token_ids]

    def take(self, index: int, final_ids: list[int] | None = None, final_steps: list[dict] | None = None):
        """The owed logprobs object of choice ``index`` (None when the request did not ask, or nothing is owed);
        at the end pass the sample's own token ids and logprobs, which hold the tokens no event carried."""
        if self.k is None:
            return None
        ids = final_ids if final_ids is not None else self.ids[index]
        steps = final_steps if final_steps is not None else self.steps[index]
        start = self.sent[index]
        if start >= len(ids):
            return None
        obj = openai_logprobs(self.kind, ids[start:], steps[start:], self.k, self.tokenizer)
        self.sent[index] = len(ids)
        if "text_offset" in obj:
            obj["text_offset"] = [o + self.offset[index] for o in obj["text_offset"]]
            self.offset[index] += sum(len(t) for t in obj["tokens"])
        return obj


def usage_chunk(req: GenerationRequest, model_name: str, out) -> dict:
    obj = "chat.completion.chunk" if req.is_chat else "text_completion"
    model_name = req.prepared.params.lora or model_name
    return {"id": req.request_id, "object": obj, "created": req.created, "model": model_name, "choices": [],
            "usage": usage(out.num_prompt_tokens, out.num_completion_tokens)}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def embedding_inputs(body) -> list:
    """An embeddings body's ``input``: a string, a list of strings, token ids or lists of token ids."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    inp = body.get("input")
    if isinstance(inp, str) or (isinstance(inp, list) and inp and all(isinstance(t, int) for t in inp)):
        inp = [inp]
    if not isinstance(inp, list) or not inp or not all(
            (isinstance(x, str) and x.strip()) or (isinstance(x, list) and x and all(isinstance(t, int) for t in x))
            for x in inp):
        raise ApiError(400, "input must be a non-empty string, a list of them, or token ids", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be float or base64", param="encoding_format")
    return inp
