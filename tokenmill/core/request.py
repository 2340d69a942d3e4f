"""Request: one prompt's journey through the engine.

A request holds its token ids (prompt, then outputs) and ``num_computed_tokens``, the number of those tokens whose
K/V sit in the cache. There is no prefill or decode phase stored anywhere: a request is "prefilling" exactly while
more than one of its tokens is still uncomputed. The scheduler only ever moves ``num_computed_tokens`` towards
``num_tokens``; preemption (recompute) resets it to 0 and keeps the outputs, so they are recomputed as a prompt;
preemption by swapping keeps it (the K/V wait in host memory).
"""

from __future__ import annotations

import enum

from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, its KV freed; recomputed when readmitted
    SWAPPED = "swapped"  # waiting again, its computed KV in host swap blocks; copied back when readmitted
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        long_rope_from: int | None = None,
    ) -> None:
        """``long_rope_from``: a LongRoPE model's switch (``RopeConfig.long_rope_from``), which keys the prefix
        cache of a request whose prompt is longer than it (all its tokens take the long factors, so its blocks hold
        other K/V than the same tokens of a shorter prompt)."""
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r} has an empty prompt")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority  # core/priority.py: 0 online (first), 1 a batch row (in what online leaves)
        # what keys the first cached block besides the tokens: the LoRA adapter (blocks never shared across
        # adapters), and LongRoPE's long set where the prompt takes it
        long = long_rope_from is not None and len(prompt_token_ids) > long_rope_from
        self.cache_salt = (sampling_params.lora, "long-rope") if long else sampling_params.lora
        # Token ids that end the request: EOS (unless ignore_eos) and the request's own stop tokens.
        stop_ids = set(sampling_params.stop_token_ids)
        if not sampling_params.ignore_eos:
            stop_ids |= eos_token_ids
        self.stop_token_ids = frozenset(stop_ids)
        self.all_token_ids: list[int] = list(prompt_token_ids)  # prompt followed by outputs
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self.logprobs: list[dict[int, float]] | None = [] if sampling_params.logprobs is not None else None
        # per prompt token: {token: logprob, top alternatives...} and its rank (None for the first token)
        wants = sampling_params.prompt_logprobs is not None
        self.prompt_logprobs: list[dict[int, float] | None] | None = [None] if wants else None
        self.prompt_ranks: list[int | None] | None = [None] if wants else None
        # what the model runner keeps for this request (worker/block_table.RequestState: its block-table row, its
        # grammar matcher); opaque here, and released by the runner when the request finishes
        self.worker_state = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        """True until the request is decoding: it has sampled a token and only that last token is uncomputed.
        Covers a prompt (including its last token) and a recompute after preemption."""
        return self.num_output_tokens == 0 or self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)

    def add_prompt_logprobs(self, first: int, entries: list[dict[int, float]], ranks: list[int]) -> None:
        """Records the logprobs of prompt tokens ``first, first + 1, ...``; positions already recorded (a chunk
        computed again after a preemption) are skipped, so each prompt token has exactly one entry."""
        have = len(self.prompt_logprobs)
        skip = have - first
        if skip < 0:
            raise RuntimeError(f"{self}: prompt logprobs from token {first} arrived before token {have}")
        self.prompt_logprobs.extend(entries[skip:])
        self.prompt_ranks.extend(ranks[skip:])

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"status={self.status.value})"
        )
