"""RequestOutput: what the engine hands back for one finished request."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text, when the request was given as text
    prompt_token_ids: list[int]
    text: str  # detokenised once at the end; a stop string that ended the request is not included
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token, stop string) or "length" (max_tokens, max_model_len)
    stop_reason: int | str | None = None  # the stop token id or stop string, if one ended the request
    logprobs: list[dict[int, float]] | None = None
    num_preemptions: int = 0
    # with SamplingParams.prompt_logprobs: per prompt token, {its id: its logprob, the top alternatives: theirs}
    # and its rank among all tokens (1 = the most likely); None for the first token, which nothing predicts
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids)
