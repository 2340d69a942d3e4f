"""Sampler: logits of the sampled rows -> next token per request (greedy, temperature, top-k, top-p, seeds).

Sampling draws ``argmax(probs / E)`` with ``E ~ Exponential(1)`` per vocabulary entry, which is an exact draw from
``probs``. A request with a seed draws its noise from its own generator, so its tokens depend only on its own
logits and seed, never on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row, when the request asked for logprobs


class Sampler:
    def __init__(self, seed: int, device: torch.device, argmax=None) -> None:
        """``argmax``: the kernel family's row argmax (``ops.argmax``); torch.argmax by default."""
        self.device = device
        self._argmax = argmax or (lambda x: x.argmax(dim=-1))
        self.shared_generator = torch.Generator(device=device)
        self.shared_generator.manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def _generator(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self.shared_generator
        g = self._generators.get(request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(params.seed)
            self._generators[request_id] = g
        return g

    def __call__(
        self,
        logits: torch.Tensor,  # [num_rows, vocab] float32 or the model's dtype (widened where a row needs more)
        request_ids: list[str],
        params: list[SamplingParams],
    ) -> SamplerOutput:
        token_ids = self._argmax(logits)  # [num_rows]; final for greedy rows
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            probs = _filtered_probs(logits[rows].float(), [params[i] for i in random_rows])  # [num_random, vocab]
            noise = torch.empty_like(probs)
            for j, i in enumerate(random_rows):
                noise[j].exponential_(generator=self._generator(request_ids[i], params[i]))
            token_ids[rows] = self._argmax(probs / noise)
        ids = token_ids.tolist()
        logprobs: list[dict[int, float] | None] = [None] * len(params)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            lp = torch.log_softmax(logits[wanted].float(), dim=-1)  # [num_wanted, vocab]
            for j, i in enumerate(wanted):
                entry = {ids[i]: lp[j, ids[i]].item()}
                k = params[i].logprobs
                if k:
                    top = lp[j].topk(k)
                    entry.update(zip(top.indices.tolist(), top.values.tolist()))
                logprobs[i] = entry
        return SamplerOutput(ids, logprobs)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Softmax of temperature-scaled logits with top-k and top-p applied. [rows, vocab] -> [rows, vocab]."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    logits = logits / temps[:, None]
    vocab = logits.shape[-1]
    if any(p.top_k or p.top_p < 1.0 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [rows, vocab]
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device)
        drop = ranks >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of all better-ranked tokens
        drop = mass_before >= top_p[:, None]  # the top token always survives (mass_before = 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)
