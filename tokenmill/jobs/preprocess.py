"""Lines -> ready requests (token ids and SamplingParams) or JobErrors, tokenising a chunk of lines at once.

``max_tokens`` and the context: a request never runs past ``max_model_len``. The job-wide default ``max_tokens``
is an upper bound, capped to the room the prompt leaves. A line's own ``max_tokens`` that does not fit is a
``context_length_exceeded`` error record under ``context_overflow="error"`` (the default, as OpenAI's API answers),
or capped the same way under ``"cap"``.

Structured outputs: a request's constraint (``response_format`` / ``structured_outputs`` / the job default) is
compiled here, once per distinct constraint (``grammars`` caches them and is handed to the engine), so an invalid
schema, regex or grammar is an ``invalid_structured_output`` error record of the validation pass.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from tokenmill.engine.loop import Submission
from tokenmill.jobs.records import (CHAT_URL, COMPLETIONS_URL, JobError, JobRequest, check_batch_line, id_key,
                                    parse_line)
from tokenmill.sampling_params import SCORE_PARAMS, SamplingParams

CONTEXT_OVERFLOW = ("error", "cap")


@dataclass
class Prepared:
    request: JobRequest
    token_ids: list[int]
    params: SamplingParams
    score_from: int | None = None  # score jobs: the first scored token (the continuation's first, or 1)

    @property
    def max_tokens(self) -> int:
        """The most tokens the row can generate: max_tokens for each of its samples (n, or best_of)."""
        return self.params.max_tokens * self.params.num_samples

    def submission(self) -> Submission:
        """This row as the engine loop takes it (id ``L<line>``: unique in a job, since a line is one row)."""
        return Submission(f"L{self.request.line_no}", self.token_ids, self.params, payload=self)


TASKS = ("generate", "score")


class Preprocessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, sampling_defaults: dict,
                 context_overflow: str = "error", grammars=None, task: str = "generate",
                 max_num_seqs: int | None = None, endpoint: str | None = None,
                 models: set[str] | None = None, loras: frozenset[str] = frozenset()) -> None:
        """``task``: "generate", or "score" (``tokenmill run --task score``: each row's prompt, or its continuation
        after the prompt, is scored by the model; the rows' sampling fields do not apply). ``max_num_seqs``: when
        given (the server's), a request whose samples (n, best_of) cannot all run at once is refused; a job runs
        them as room allows. ``endpoint`` (a Batch API batch's): every line must be an OpenAI Batch request for that
        url, and name one of ``models`` (or none); any other line is an error record. ``loras``: the LoRA adapters
        the engine loaded; a plain row's ``lora`` must name one, and an OpenAI line whose ``model`` names one runs
        with it (as vLLM serves adapters under their names)."""
        self.loras = frozenset(loras)
        self.max_num_seqs = max_num_seqs
        self.endpoint = endpoint
        self.models = models
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task = task
        if context_overflow not in CONTEXT_OVERFLOW:
            raise ValueError(f"context_overflow must be one of {', '.join(CONTEXT_OVERFLOW)}, got {context_overflow!r}")
        self.context_overflow = context_overflow
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.grammars = grammars  # a structured.backend.GrammarBackend, or None: constraints are not compiled here
        self.defaults = dict(sampling_defaults)
        SamplingParams.from_dict(self.defaults)  # the job's own defaults must be valid (checked by the CLI)

    @staticmethod
    def id_key(record_id) -> str:
        return id_key(record_id)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def process(self, lines: list[tuple[int, bytes]]) -> list[tuple[int, Prepared | JobError]]:
        """``lines`` are (line_no, raw bytes) of non-blank lines; results keep their order."""
        parsed: list[tuple[int, JobRequest | JobError]] = []
        for line_no, raw in lines:
            try:
                parsed.append((line_no, self._check_endpoint(parse_line(raw, line_no, self.apply_chat_template))))
            except JobError as e:
                parsed.append((line_no, e))
        # Tokenise every text prompt of the chunk in two batched calls (chat prompts carry their special tokens).
        ids: dict[int, list[int]] = {}
        for is_chat in (False, True):
            group = [(n, r) for n, r in parsed if isinstance(r, JobRequest) and r.is_chat == is_chat
                     and isinstance(r.prompt, str)]
            if group:
                enc = self.tokenizer([r.prompt for _, r in group], add_special_tokens=not is_chat).input_ids
                ids.update((n, t) for (n, _), t in zip(group, enc))
        conts = [(n, r) for n, r in parsed if isinstance(r, JobRequest) and r.continuation is not None]
        cont_ids: dict[int, list[int]] = {}
        if conts and self.task == "score":  # tokenized on its own (no special tokens), appended to the prompt's
            enc = self.tokenizer([r.continuation for _, r in conts], add_special_tokens=False).input_ids
            cont_ids.update((n, t) for (n, _), t in zip(conts, enc))
        out: list[tuple[int, Prepared | JobError]] = []
        for line_no, r in parsed:
            if isinstance(r, JobError):
                out.append((line_no, r))
                continue
            token_ids = ids.get(line_no, r.prompt)
            try:
                if self.task == "score":
                    out.append((line_no, self._finish_score(r, token_ids, cont_ids.get(line_no))))
                    continue
                out.append((line_no, self._finish(r, token_ids)))
            except JobError as e:
                out.append((line_no, e))
        return out

    def _check_endpoint(self, r: JobRequest) -> JobRequest:
        if self.endpoint is None:
            return r
        url = CHAT_URL if r.kind == "openai_chat" else COMPLETIONS_URL
        check_batch_line(r.line_no, r.record_id, r.kind == "plain", url, self.endpoint, r.model, self.models)
        return r

    def _finish_score(self, r: JobRequest, token_ids: list[int], continuation: list[int] | None) -> Prepared:
        """A score row: its prompt (and continuation) as one request that computes its prompt's logprobs and
        generates one (unused) token; ``score_from`` marks where the scored tokens start."""
        if r.kind != "plain":
            raise JobError("not_a_score_row", f"line {r.line_no}: a score job takes rows {{id, prompt[, "
                           f"continuation]}} or {{id, messages[, continuation]}}; for OpenAI lines use a generate "
                           f"job with /v1/completions echo + logprobs", r.record_id, True)
        if not token_ids:
            raise JobError("empty_prompt", f"line {r.line_no}: the prompt has no tokens", r.record_id)
        if r.continuation is not None and not continuation:
            raise JobError("invalid_continuation", f"line {r.line_no}: the continuation has no tokens", r.record_id)
        score_from = len(token_ids) if continuation else 1
        ids = list(token_ids) + list(continuation or [])
        if len(ids) < 2:
            raise JobError("empty_prompt", f"line {r.line_no}: a score row needs at least 2 tokens (the first one is "
                           f"not scored), it has 1", r.record_id)
        if len(ids) >= self.max_model_len:
            raise JobError("prompt_too_long", f"line {r.line_no}: the row has {len(ids)} tokens to score; "
                           f"max_model_len is {self.max_model_len} (at most {self.max_model_len - 1})", r.record_id)
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise JobError("invalid_prompt", f"line {r.line_no}: token ids must be in [0, {self.vocab_size})",
                           r.record_id)
        lora = self._lora_of(r)
        return Prepared(r, ids, SCORE_PARAMS if lora is None else replace(SCORE_PARAMS, lora=lora), score_from)

    def _lora_of(self, r: JobRequest) -> str | None:
        """The row's LoRA adapter: a plain row's ``lora`` (which must be loaded), an OpenAI line's ``model`` when it
        names a loaded adapter; else None (the base model)."""
        if r.kind != "plain":
            return r.model if isinstance(r.model, str) and r.model in self.loras else None
        lora = r.sampling.get("lora")
        if lora is not None and lora not in self.loras:
            loaded = ", ".join(sorted(self.loras)) or "none"
            raise JobError("unknown_lora", f"line {r.line_no}: lora {str(lora)[:60]!r} is not a loaded adapter "
                           f"(loaded: {loaded}; load one with --lora NAME=PATH)", r.record_id)
        return lora

    def _finish(self, r: JobRequest, token_ids: list[int]) -> Prepared:
        openai = r.kind != "plain"
        if not token_ids:
            raise JobError("empty_prompt", f"line {r.line_no}: the prompt has no tokens", r.record_id, openai)
        if len(token_ids) >= self.max_model_len:
            raise JobError(
                "prompt_too_long",
                f"line {r.line_no}: the prompt has {len(token_ids)} tokens; max_model_len is {self.max_model_len}",
                r.record_id, openai,
            )
        if any(t < 0 or t >= self.vocab_size for t in token_ids):
            raise JobError(
                "invalid_prompt", f"line {r.line_no}: token ids must be in [0, {self.vocab_size})", r.record_id, openai
            )
        values = {**self.defaults, **r.sampling}
        lora = self._lora_of(r)
        if lora is not None:
            values["lora"] = lora
        room = self.max_model_len - len(token_ids)
        asked = values.get("max_tokens")
        if isinstance(asked, int) and asked > room:
            if "max_tokens" in r.sampling and self.context_overflow == "error":
                raise JobError(
                    "context_length_exceeded",
                    f"line {r.line_no}: max_tokens={asked} does not fit: the prompt has {len(token_ids)} tokens and "
                    f"max_model_len is {self.max_model_len}, so at most {room} can be generated (lower max_tokens, "
                    f"or run with --context-overflow cap)", r.record_id, openai)
            values["max_tokens"] = room
        try:
            params = SamplingParams.from_dict(values)
        except (ValueError, TypeError) as e:
            raise JobError("invalid_sampling", f"line {r.line_no}: {e}", r.record_id, openai) from None
        if self.max_num_seqs is not None and params.num_samples > self.max_num_seqs:
            which = "best_of" if params.best_of is not None else "n"
            raise JobError("invalid_sampling", f"line {r.line_no}: {which}={params.num_samples} samples cannot run at "
                           f"once: max_num_seqs is {self.max_num_seqs}", r.record_id, openai)
        if params.structured is not None and self.grammars is not None:
            try:
                self.grammars.compile(params.structured)
            except ValueError as e:
                raise JobError("invalid_structured_output", f"line {r.line_no}: {e}", r.record_id, openai) from None
        return Prepared(r, token_ids, params)
