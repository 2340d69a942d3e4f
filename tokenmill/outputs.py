"""RequestOutput: what the engine hands back for one finished request; CompletionOutput: one of its samples.

A request asks for ``n`` samples (SamplingParams.n, default 1); its RequestOutput holds them in ``outputs``, in
index order. ``text``, ``token_ids``, ``finish_reason``, ``stop_reason`` and ``logprobs`` are the first sample's
(all of a request with n = 1).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    index: int  # the sample's place among the request's n (0 .. n-1)
    text: str  # detokenised once at the end; a stop string that ended the sample is not included
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token, stop string), "length" (max_tokens, max_model_len) or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string, if one ended the sample
    logprobs: list[dict[int, float]] | None = None  # per token: the sampled token's logprob and the top alternatives
    cumulative_logprob: float | None = None  # the sum of the sampled tokens' logprobs, when they were computed


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text, when the request was given as text
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_preemptions: int = 0
    # with SamplingParams.prompt_logprobs: per prompt token, {its id: its logprob, the top alternatives: theirs}
    # and its rank among all tokens (1 = the most likely); None for the first token, which nothing predicts
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_token_ranks: list[int | None] | None = None
    num_generated_tokens: int = 0  # every sample's tokens, best_of's discarded ones included (the work done)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return self.outputs[0].logprobs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        """The returned samples' tokens (what OpenAI's usage counts)."""
        return sum(len(o.token_ids) for o in self.outputs)
