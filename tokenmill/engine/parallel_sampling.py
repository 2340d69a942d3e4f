"""n and best_of: one request fanned out into samples that share its prompt's KV.

A request whose SamplingParams draw more than one sample (``n > 1`` or ``best_of > 1``) runs in the scheduler as
``num_samples`` child requests, ids ``{request_id}::{i}``, added together. With prefix caching the scheduler's
pending-block rule (a waiting request whose next prompt block a running request is computing waits for it) holds
every child but the first until the first has computed its prompt's blocks; they then start from those blocks and
each computes only its prompt's last, partial block: the prompt is prefilled once, whatever n is.

Invariants:
- child i's params are the request's with n = 1, no best_of and ``seed = sample_seed(seed, i)`` (sample 0 keeps the
  seed itself); only child 0 computes prompt logprobs (the others take prefix-cache hits instead);
- when samples are ranked (best_of > n) every child records its sampled tokens' logprobs; they are dropped from the
  output unless the request asked for logprobs;
- the request's RequestOutput is made once, when its last child finishes: the n samples, in index order, or, with
  best_of > n, the n with the highest mean logprob per token (OpenAI's definition of "best"; ties: the lower index),
  best first and re-indexed 0..n-1.
"""

from __future__ import annotations

import dataclasses

from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SamplingParams

CHILD_SEP = "::"
_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, index: int) -> int:
    """Sample ``index``'s seed: the seed itself for sample 0, else a splitmix64 mix of (seed, index) in [0, 2^63), so
    samples of one seed are unrelated to each other and to requests seeded ``seed + 1``, ``seed + 2``, ..."""
    if index == 0:
        return seed
    x = (seed + index * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def child_id(request_id: str, index: int) -> str:
    return f"{request_id}{CHILD_SEP}{index}"


class ParentRequest:
    """A request's samples in flight: their ids and params, and the outputs of those finished so far."""

    def __init__(self, request_id: str, params: SamplingParams) -> None:
        self.request_id = request_id
        self.params = params
        self.ranked = params.num_samples > params.n
        self.child_ids = [child_id(request_id, i) for i in range(params.num_samples)]
        self._done: dict[int, RequestOutput] = {}

    def child_params(self, index: int) -> SamplingParams:
        p = self.params
        return dataclasses.replace(
            p, n=1, best_of=None,
            seed=sample_seed(p.seed, index) if p.seed is not None else None,
            prompt_logprobs=p.prompt_logprobs if index == 0 else None,
            logprobs=0 if self.ranked and p.logprobs is None else p.logprobs,
        )

    def add(self, index: int, out: RequestOutput) -> RequestOutput | None:
        """Records child ``index``'s output; returns the request's output once every child has finished."""
        self._done[index] = out
        if len(self._done) < len(self.child_ids):
            return None
        return self._merged()

    def _merged(self) -> RequestOutput:
        samples = [dataclasses.replace(self._done[i].outputs[0], index=i) for i in range(len(self.child_ids))]
        if self.ranked:
            samples = sorted(samples, key=lambda s: (-_mean_logprob(s), s.index))[: self.params.n]
            samples = [dataclasses.replace(s, index=i, logprobs=s.logprobs if self.params.logprobs is not None
                                           else None) for i, s in enumerate(samples)]
        first = self._done[0]
        return RequestOutput(
            request_id=self.request_id,
            prompt=None,
            prompt_token_ids=first.prompt_token_ids,
            outputs=samples,
            num_preemptions=sum(o.num_preemptions for o in self._done.values()),
            prompt_logprobs=first.prompt_logprobs,
            prompt_token_ranks=first.prompt_token_ranks,
            num_generated_tokens=sum(o.num_generated_tokens for o in self._done.values()),
        )


def _mean_logprob(sample: CompletionOutput) -> float:
    if not sample.token_ids:
        return 0.0
    return (sample.cumulative_logprob or 0.0) / len(sample.token_ids)
