"""What one step carries between the scheduler and the runner, and what the scheduler counts over steps.

``SchedulerOutput``: the step's chunks (``ScheduledRequest``: a request's tokens ``[num_computed_tokens,
num_computed_tokens + num_scheduled_tokens)`` and its block ids), the requests finished since the previous step (the
runner releases what it kept for them), and the blocks to swap. ``ModelRunnerOutput``: what the runner sends back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.core.request import Request


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed_tokens, num_computed_tokens + num_scheduled_tokens)."""

    request: Request
    num_computed_tokens: int
    num_scheduled_tokens: int
    block_ids: list[int]

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last token, so the step samples its next one."""
        return self.num_computed_tokens + self.num_scheduled_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    total_num_scheduled_tokens: int
    preempted_request_ids: list[str] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)  # finished since the previous step
    # preemption_mode="swap": (device block, host block) pairs to copy out and (host block, device block) pairs to
    # copy in, before the step's forward pass; at most one of the two is non-empty
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    sampled_token_ids: dict[str, int]  # request_id -> token, only for chunks that sample
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)  # request_id -> {token_id: logprob}
    # request_id -> (first prompt position, its entries, their ranks): the prompt tokens this step's chunk predicted
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]], list[int]]] = field(default_factory=dict)


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_preemptions: int = 0
    num_swap_outs: int = 0  # preemptions that kept the victim's K/V in swap space (the rest recompute)
    num_scheduled_tokens: int = 0
    num_prefill_tokens: int = 0  # tokens scheduled in chunks that did not sample (or the last prompt chunk)
    num_decode_tokens: int = 0
    sum_running: int = 0  # sum over steps of the number of requests scheduled (for the average batch size)
    # Steps that left capacity unused while requests waited (fewer than max_num_seqs scheduled and token budget
    # left): the CPU stand-in for a GPU idling between prefill and decode phases.
    num_underfilled_steps: int = 0
    # Prefix caching, counted as vLLM does: tokens of admitted requests looked up, and of those found in the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def avg_batch_size(self) -> float:
        return self.sum_running / self.num_steps if self.num_steps else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
