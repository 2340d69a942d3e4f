"""One input line -> a JobRequest (what to run) or a JobError (why not), and results -> output records.

Input lines, detected per line:
- ``{"id", "prompt"}`` (raw completion) or ``{"id", "messages"}`` (chat template applied), with optional per-line
  ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop`` overriding the job defaults, and an output constraint
  as OpenAI's ``response_format`` or vLLM's ``structured_outputs`` (``{"json" | "regex" | "choice" | "grammar" |
  "json_object": ...}``);
- OpenAI Batch API lines ``{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
  "body": {...}}`` (``response_format`` / ``structured_outputs`` in the body).

Every rejection carries a stable error ``code`` (see ``ERROR_CODES``) and a human message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenmill.jobs.inputs import BadRow
from tokenmill.sampling_params import MAX_LOGPROBS, SamplingParams
from tokenmill.structured.params import StructuredOutputs, from_response_format

ERROR_CODES = {
    "invalid_utf8": "the line is not valid UTF-8 (or a JSON string in it holds a lone surrogate escape)",
    "invalid_json": "the line is not valid JSON (strict: no NaN / Infinity, at most a few hundred levels of nesting)",
    "line_too_long": "the line is longer than 64 MiB",
    "invalid_csv": "the CSV record cannot be read (unbalanced quotes, a field over 64 MiB)",
    "not_an_object": "the line is JSON but not an object",
    "invalid_id": "id (or custom_id) is missing or not a string / integer",
    "duplicate_id": "an earlier line has the same id",
    "missing_input": "the line has no input (neither prompt nor messages, or both; no text to embed)",
    "invalid_prompt": "prompt is not a string or a list of token ids",
    "invalid_messages": "messages is not a list of {role, content} objects the chat template accepts",
    "empty_prompt": "the prompt is empty",
    "prompt_too_long": "the prompt does not fit the model's max_model_len",
    "invalid_sampling": "a sampling value is out of range or of the wrong type",
    "unsupported_url": "the OpenAI url is not one this command serves (run: chat/completions; embed: embeddings)",
    "unsupported_method": "the OpenAI method is not POST",
    "mismatched_endpoint": "a Batch API batch's line asks for another url than the batch's endpoint",
    "not_a_batch_request": "a Batch API batch's line is a plain row, not an OpenAI Batch request",
    "model_not_found": "a Batch API batch's line names a model the server does not serve",
    "unsupported_n": "several embedding inputs on one line are not supported",
    "invalid_body": "the OpenAI body is missing, not an object, or holds an unsupported value",
    "unsupported_field": "the OpenAI body asks for something tokenmill does not do (tools, ...)",
    "invalid_structured_output": "response_format / structured_outputs is malformed, or its schema, regex or grammar "
                                 "does not compile",
    "context_length_exceeded": "the prompt plus the line's max_tokens do not fit the model's max_model_len",
    "invalid_continuation": "a score row's continuation is not a non-empty string",
    "unknown_lora": "the row names a LoRA adapter (a plain row's lora, an OpenAI line's model) the job did not load "
                    "(--lora NAME=PATH)",
    "not_a_score_row": "a score job (--task score) got an OpenAI Batch line; it takes {id, prompt[, continuation]}",
    "invalid_text": "text (or input) is not a string or a list of token ids",
    "empty_text": "the text to embed is empty",
    "dimensions_mismatch": "the requested dimensions differ from the model's embedding size",
    "shard_failed": "a distributed job (--ray) lost every worker that ran this row's shard, more than "
                    "--max-shard-retries times; the same command retries it",
}

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop", "n")
VLLM_SAMPLING_KEYS = ("top_k", "ignore_eos")  # vLLM's extensions of the OpenAI body, honoured the same way


class JobError(Exception):
    def __init__(self, code: str, message: str, record_id: Any = None, openai: bool = False) -> None:
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.record_id = record_id
        self.openai = openai

    def to_record(self, line_no: int) -> dict:
        rec = {"line": line_no, "id": self.record_id, "code": self.code, "message": self.message}
        if self.openai:  # also readable as an OpenAI Batch error-file line
            rec.update(custom_id=self.record_id, response=None, error={"code": self.code, "message": self.message})
        return rec


def check_batch_line(line_no: int, record_id: Any, plain: bool, url: str | None, endpoint: str, model: str | None,
                     models: set[str] | None) -> None:
    """A Batch API batch's line must be an OpenAI request (not a plain row) for the batch's endpoint (``url``: the
    line's, None when already checked) naming, if anything, a model the server serves; raises JobError."""
    if plain:
        raise JobError("not_a_batch_request", f"line {line_no}: a batch's lines are OpenAI Batch requests "
                       f"({{custom_id, method, url, body}}); this one is a plain row", record_id, True)
    if url is not None and url != endpoint:
        raise JobError("mismatched_endpoint", f"line {line_no}: url {url} does not match the batch's endpoint "
                       f"{endpoint}", record_id, True)
    if models is not None and model is not None and model not in models:
        raise JobError("model_not_found", f"line {line_no}: model {json.dumps(model)[:60]} does not exist; this "
                       f"server serves {', '.join(sorted(models))}", record_id, True)


@dataclass
class JobRequest:
    """A validated line, before tokenisation. ``prompt`` is text (template applied for chat) or token ids."""

    line_no: int
    record_id: Any  # the user's id (plain) or custom_id (OpenAI), type preserved
    kind: str  # "plain", "openai_chat" or "openai_completion"
    prompt: str | list[int]
    sampling: dict  # per-line overrides of the job's sampling defaults
    is_chat: bool
    echo: bool = False  # completions: the prompt (and, with logprobs, its tokens' logprobs) precede the completion
    continuation: str | None = None  # score jobs: the text scored after the prompt (the prompt is then its context)
    score_only: bool = False  # echo with max_tokens 0: the prompt scored, nothing generated (one token runs, unused)
    prompt_logprobs: int | None = None  # vLLM's body field: the response carries the prompt tokens' logprobs (top K)
    model: Any = None  # an OpenAI line's body.model (checked only by a server's batch: Preprocessor.models)

    @property
    def id_key(self) -> str:
        return id_key(self.record_id)


def id_key(record_id: Any) -> str:
    """Canonical form of an id for equality: 1 and "1" are different ids."""
    return json.dumps(record_id)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (use a number or null)")


def decode_line(raw, line_no: int) -> dict:
    """UTF-8 -> strict JSON -> an object, or JobError (invalid_utf8 / invalid_json / not_an_object, or the code of a
    row the input reader could not read). Never raises anything else, whatever the bytes."""
    if isinstance(raw, BadRow):
        raise JobError(raw.code, raw.message)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobError("invalid_utf8", f"line {line_no} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise JobError("invalid_json", f"line {line_no} is not valid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise JobError("invalid_json", f"line {line_no} is nested too deeply to read as JSON") from None
    except ValueError as e:  # NaN / Infinity, an integer of more than 4300 digits
        raise JobError("invalid_json", f"line {line_no} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise JobError("not_an_object", f"line {line_no} is a JSON {type(obj).__name__}, expected an object")
    if (b"\\ud" in raw or b"\\uD" in raw) and (where := _lone_surrogate(obj)):
        raise JobError("invalid_utf8", f"line {line_no}: {where} holds a lone UTF-16 surrogate escape, which is not "
                                       f"valid Unicode text")
    return obj


def _lone_surrogate(obj) -> str | None:
    """Where in ``obj`` a string with a lone surrogate sits ("a key", "a string value"), or None. Iterative: the
    object may be nested as deep as the JSON parser allows."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                if not _is_unicode(k):
                    return f"the key {k.encode('utf-8', 'backslashreplace').decode()[:40]!r}"
                stack.append(v)
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, str) and not _is_unicode(x):
            return "a string value"
    return None


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_openai_line(obj: dict) -> bool:
    return "custom_id" in obj or "body" in obj or "url" in obj


def parse_line(raw: bytes, line_no: int, apply_chat_template) -> JobRequest:
    """Parses and checks one non-blank line; raises JobError. ``apply_chat_template(messages) -> str``."""
    obj = decode_line(raw, line_no)
    if is_openai_line(obj):
        return _parse_openai(obj, line_no, apply_chat_template)
    return _parse_plain(obj, line_no, apply_chat_template)


def check_id(value: Any, name: str, line_no: int, openai: bool) -> Any:
    ok = isinstance(value, str) and value != "" or (isinstance(value, int) and not isinstance(value, bool))
    if openai:
        ok = isinstance(value, str) and value != ""
    if not ok:
        want = "a non-empty string" if openai else "a non-empty string or an integer"
        shown = "missing" if value is None else f"{type(value).__name__} {json.dumps(value)[:40]}"
        raise JobError("invalid_id", f"line {line_no}: {name} must be {want}, got {shown}", openai=openai)
    return value


def _parse_plain(obj: dict, line_no: int, apply_chat_template) -> JobRequest:
    rid = check_id(obj.get("id"), "id", line_no, openai=False)
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        which = "both prompt and messages" if has_prompt else "neither prompt nor messages"
        raise JobError("missing_input", f"line {line_no}: has {which}; give exactly one", rid)
    sampling = {k: obj[k] for k in SAMPLING_KEYS + ("best_of", "lora") if k in obj}
    _structured(obj, sampling, line_no, rid, openai=False)
    _check_sampling(sampling, line_no, rid, openai=False)
    if has_messages:
        prompt = _render_chat(obj["messages"], line_no, rid, apply_chat_template, openai=False)
    else:
        prompt = _check_prompt(obj["prompt"], line_no, rid, openai=False)
    continuation = obj.get("continuation")
    if continuation is not None and (not isinstance(continuation, str) or not continuation):
        raise JobError("invalid_continuation", f"line {line_no}: continuation must be a non-empty string", rid)
    return JobRequest(line_no, rid, "plain", prompt, sampling, has_messages, continuation=continuation)


# OpenAI body fields tokenmill honours (beyond the sampling keys), and fields it accepts only at their default value.
_BODY_FIELDS = {
    CHAT_URL: {"model", "messages", "max_completion_tokens", "n", "logprobs", "top_logprobs", "user", "metadata",
               "store", "service_tier", "stream", "response_format", "structured_outputs", "prompt_logprobs"},
    COMPLETIONS_URL: {"model", "prompt", "n", "logprobs", "user", "stream", "echo", "best_of", "suffix",
                      "response_format", "structured_outputs", "prompt_logprobs"},
}


def _structured(obj: dict, sampling: dict, line_no: int, rid: Any, openai: bool) -> None:
    """``response_format`` (OpenAI) or ``structured_outputs`` (vLLM) -> ``sampling["structured"]``: a dict the
    SamplingParams turns into StructuredOutputs, or None for ``{"type": "text"}`` (which overrides a job default)."""
    rf, so = obj.get("response_format"), obj.get("structured_outputs")
    if rf is None and so is None:
        return
    where = "body." if openai else ""
    if rf is not None and so is not None:
        raise JobError("invalid_structured_output", f"line {line_no}: give {where}response_format or "
                       f"{where}structured_outputs, not both", rid, openai)
    try:
        spec = from_response_format(rf) if rf is not None else StructuredOutputs.from_value(so)
    except (ValueError, TypeError) as e:  # response_format's messages name it; the others name their field
        name = "" if rf is not None else "structured_outputs: "
        raise JobError("invalid_structured_output", f"line {line_no}: {where}{name}{e}", rid, openai) from None
    sampling["structured"] = spec
_DEFAULT_ONLY = {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "stream": (False,),
                 "suffix": ("",), "parallel_tool_calls": (True, False)}


def _check_body_fields(body: dict, url: str, line_no: int, rid: Any) -> None:
    """Every field of the body is one tokenmill implements (or one it may ignore: model, user, metadata, ...), so
    nothing a user asked for is silently dropped."""
    for key, value in body.items():
        if value is None or key in SAMPLING_KEYS or key in VLLM_SAMPLING_KEYS:
            continue
        if key in _DEFAULT_ONLY:
            if not any(value == d and type(value) is type(d) for d in _DEFAULT_ONLY[key]):
                raise JobError("unsupported_field", f"line {line_no}: body.{key}={json.dumps(value)[:40]} is not "
                               f"supported by tokenmill (only {json.dumps(_DEFAULT_ONLY[key][0])}); remove it to run "
                               f"this request", rid, True)
            continue
        if key not in _BODY_FIELDS[url]:
            raise JobError("unsupported_field", f"line {line_no}: body.{key} is not supported by tokenmill for {url}; "
                           f"remove it to run this request", rid, True)


def _logprobs_request(body: dict, url: str, line_no: int, rid: Any) -> int | None:
    """The number of top alternatives to return per token (0 = only the sampled token's), or None for no logprobs.
    Chat: ``logprobs: true`` with ``top_logprobs: k``; completions: ``logprobs: k``."""
    def as_count(name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LOGPROBS:
            raise JobError("invalid_body", f"line {line_no}: body.{name} must be an integer in [0, {MAX_LOGPROBS}], "
                           f"got {json.dumps(value)[:40]}", rid, True)
        return value

    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if url == COMPLETIONS_URL:
        return None if lp is None else as_count("logprobs", lp)
    if lp is not None and not isinstance(lp, bool):
        raise JobError("invalid_body", f"line {line_no}: body.logprobs must be true or false, got "
                       f"{json.dumps(lp)[:40]}", rid, True)
    if top is not None and not lp:
        raise JobError("invalid_body", f"line {line_no}: body.top_logprobs needs logprobs: true", rid, True)
    return (as_count("top_logprobs", top) if top is not None else 0) if lp else None


def _parse_openai(obj: dict, line_no: int, apply_chat_template) -> JobRequest:
    rid = check_id(obj.get("custom_id"), "custom_id", line_no, openai=True)
    method = obj.get("method", "POST")
    if method != "POST":
        raise JobError("unsupported_method", f"line {line_no}: method {json.dumps(method)[:40]} is not supported; use "
                       f"POST", rid, True)
    url = obj.get("url")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise JobError(
            "unsupported_url", f"line {line_no}: url {json.dumps(url)[:60]} is not supported; use {CHAT_URL} or "
            f"{COMPLETIONS_URL}", rid, True,
        )
    body = obj.get("body")
    if not isinstance(body, dict):
        raise JobError("invalid_body", f"line {line_no}: body must be an object", rid, True)
    _check_body_fields(body, url, line_no, rid)
    keys = SAMPLING_KEYS + VLLM_SAMPLING_KEYS + (("best_of",) if url == COMPLETIONS_URL else ())
    sampling = {k: body[k] for k in keys if k in body and body[k] is not None}
    if body.get("max_completion_tokens") is not None:
        sampling["max_tokens"] = body["max_completion_tokens"]
    logprobs = _logprobs_request(body, url, line_no, rid)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    _structured(body, sampling, line_no, rid, openai=True)
    if url == COMPLETIONS_URL and body.get("echo") is True and sampling.get("max_tokens") == 0:
        checked = {**sampling, "max_tokens": 1}  # max_tokens 0 is a score-only echo (_echo)
    else:
        checked = sampling
    vllm_prompt = body.get("prompt_logprobs")
    if vllm_prompt is not None:
        if type(vllm_prompt) is not int or not 0 <= vllm_prompt <= MAX_LOGPROBS:
            raise JobError("invalid_body", f"line {line_no}: body.prompt_logprobs must be an integer in [0, "
                           f"{MAX_LOGPROBS}], got {json.dumps(vllm_prompt)[:40]}", rid, True)
        sampling["prompt_logprobs"] = vllm_prompt
        checked = {**checked, "prompt_logprobs": vllm_prompt}
    _check_sampling(checked, line_no, rid, openai=True)
    if url == CHAT_URL:
        if "messages" not in body:
            raise JobError("missing_input", f"line {line_no}: a chat completion body needs messages", rid, True)
        prompt = _render_chat(body["messages"], line_no, rid, apply_chat_template, openai=True)
        return JobRequest(line_no, rid, "openai_chat", prompt, sampling, True, prompt_logprobs=vllm_prompt,
                          model=body.get("model"))
    if "prompt" not in body:
        raise JobError("missing_input", f"line {line_no}: a completion body needs prompt", rid, True)
    prompt = _check_prompt(body["prompt"], line_no, rid, openai=True)
    echo, score_only = _echo(body, sampling, logprobs, line_no, rid)
    return JobRequest(line_no, rid, "openai_completion", prompt, sampling, False, echo=echo, score_only=score_only,
                      prompt_logprobs=vllm_prompt, model=body.get("model"))


def _echo(body: dict, sampling: dict, logprobs: int | None, line_no: int, rid: Any) -> tuple[bool, bool]:
    """Completions' ``echo``: the prompt's text first, and with ``logprobs`` the logprobs of its tokens (the
    request's ``prompt_logprobs``; the first token's is null). ``max_tokens: 0`` with echo scores the prompt only.
    Returns (echo, score_only); the sampling dict is adjusted in place."""
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise JobError("invalid_body", f"line {line_no}: body.echo must be true or false, got "
                       f"{json.dumps(echo)[:40]}", rid, True)
    score_only = echo and sampling.get("max_tokens") == 0 and type(sampling.get("max_tokens")) is int
    if score_only:
        sampling["max_tokens"] = 1  # the request runs to its first token; the response leaves it out
    if echo and logprobs is not None:  # (vLLM's body field may have asked for more alternatives already)
        sampling["prompt_logprobs"] = max(logprobs, sampling.get("prompt_logprobs") or 0)
    return echo, score_only


def _check_prompt(prompt: Any, line_no: int, rid: Any, openai: bool) -> str | list[int]:
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if not prompt:
            raise JobError("empty_prompt", f"line {line_no}: prompt is empty", rid, openai)
        return prompt
    if not isinstance(prompt, str):
        raise JobError(
            "invalid_prompt", f"line {line_no}: prompt must be a string or a list of token ids, got "
            f"{type(prompt).__name__}", rid, openai,
        )
    if not prompt:
        raise JobError("empty_prompt", f"line {line_no}: prompt is empty", rid, openai)
    return prompt


def _render_chat(messages: Any, line_no: int, rid: Any, apply_chat_template, openai: bool) -> str:
    if not isinstance(messages, list) or not messages:
        raise JobError("invalid_messages", f"line {line_no}: messages must be a non-empty list", rid, openai)
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise JobError("invalid_messages", f"line {line_no}: messages[{i}] needs a string role", rid, openai)
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise JobError(
                    "invalid_messages", f"line {line_no}: messages[{i}].content parts must all be text", rid, openai
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise JobError(
                "invalid_messages", f"line {line_no}: messages[{i}].content must be a string", rid, openai
            )
        clean.append({"role": m["role"], "content": content})
    try:
        return apply_chat_template(clean)
    except Exception as e:  # the template itself rejects the conversation (e.g. roles out of order)
        raise JobError("invalid_messages", f"line {line_no}: the chat template rejected messages: {e}", rid, openai)


def _check_sampling(sampling: dict, line_no: int, rid: Any, openai: bool) -> None:
    try:
        SamplingParams.from_dict(sampling)
    except (ValueError, TypeError) as e:
        raise JobError("invalid_sampling", f"line {line_no}: {e}", rid, openai) from None
