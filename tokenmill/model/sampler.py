"""Sampler: logits of the sampled rows -> next token per request (greedy, temperature, top-k, top-p, seeds).

Every row is handled by the same batched tensor operations, on the logits' device, with no loop over rows and no
host sync but the final read of the sampled ids (and of the logprobs a request asked for):

- greedy rows take the row argmax (the kernel family's ``ops.argmax``);
- a random row draws by inverse CDF: the temperature-scaled softmax (top-k and top-p applied on the sorted row when
  any row asks for them), its cumulative sum in float64, and one uniform ``u`` in [0, 1) per row; the token is the
  first whose cumulative mass exceeds ``u`` times the row's total. That is an exact draw from the filtered
  distribution, and a zero-probability token is never chosen. The kernel family draws (``ops.sample_plain`` for rows
  without top-k / top-p, ``ops.sample_filtered`` for the others: on a CPU one C++ pass per row, no full sort; the
  same draws up to the summation order); the torch path below is the oracle and the other devices' path.

The uniforms are made on the host, one float64 per row, and travel to the device in the same copy as the rows'
temperature, top-k and top-p:

- a request with a ``seed`` gets ``u = hash(seed, output position)`` (splitmix64 twice): its tokens depend only on
  its own logits, seed and how many tokens it has produced, never on the batch around it, on the step in which a
  token is drawn, or on whether it was preempted and recomputed. No per-request generator is kept;
- other rows take the next uniforms of the sampler's own generator (seeded by the engine's ``seed``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]  # per row, when the request asked for logprobs


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def seeded_uniforms(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """One uniform in [0, 1) per (seed, position), 53 random bits each: [n] uint64, [n] uint64 -> [n] float64."""
    h = _splitmix64(_splitmix64(seeds.astype(np.uint64)) ^ positions.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class Sampler:
    def __init__(self, seed: int, device: torch.device, argmax=None, top_candidates: int | None = None,
                 token_logprobs=None, sample_plain=None, sample_filtered=None) -> None:
        """``argmax``: the kernel family's row argmax (``ops.argmax``); torch.argmax by default.
        ``sample_plain``: the family's draw for rows without top-k / top-p (``ops.sample_plain``: logits,
        temperatures, uniforms -> tokens); ``torch_sample_plain`` by default. ``sample_filtered``: the family's draw
        for rows with top-k / top-p (``ops.sample_filtered``: also top-k and top-p per row; None where it does not
        apply); by default, and where it returns None, the torch path below (``_draw_filtered``).
        ``token_logprobs``: the family's reduction for the logprobs a request asks for (``ops.token_logprobs``: the
        chosen token's log-softmax and the row's logsumexp, the top K taken from the logits minus it); by default
        torch's log_softmax over the widened rows.
        ``top_candidates``: how many best tokens a top-k / top-p row is first drawn from before a full sort is needed
        (``_draw_filtered``); default 256 on a CPU, 0 (always the full sort) elsewhere."""
        self.device = device
        self.top_candidates = (256 if device.type == "cpu" else 0) if top_candidates is None else top_candidates
        self._argmax = argmax or (lambda x: x.argmax(dim=-1))
        self._token_logprobs = token_logprobs
        self._sample_plain = sample_plain or torch_sample_plain
        self._sample_filtered = sample_filtered
        self._rng = np.random.Generator(np.random.PCG64(seed))  # the uniforms of rows without a seed

    def __call__(
        self,
        logits: torch.Tensor,  # [num_rows, vocab] float32 or the model's dtype (widened where a row needs more)
        params: list[SamplingParams],
        output_positions: list[int] | None = None,  # per row: how many tokens its request has produced so far
    ) -> SamplerOutput:
        num_rows = len(params)
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(random_rows) == num_rows:  # all rows draw: no argmax, no row gather
            token_ids = self._draw(logits, params, output_positions)
        else:
            token_ids = self._argmax(logits)  # [num_rows]; final for greedy rows
            if random_rows:
                rows = torch.tensor(random_rows, dtype=torch.int64).to(logits.device, non_blocking=True)
                positions = None if output_positions is None else [output_positions[i] for i in random_rows]
                token_ids[rows] = self._draw(logits[rows], [params[i] for i in random_rows], positions)

        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:  # computed before the one read of the ids: still no sync of its own
            w = torch.tensor(wanted, dtype=torch.int64).to(logits.device, non_blocking=True)
            k_max = max(params[i].logprobs for i in wanted)
            top_v = top_i = None  # [num_wanted, k_max] each, when a row asks for alternatives
            if self._token_logprobs is not None:  # one pass per row over the logits as the head left them
                rows = logits[w]  # [num_wanted, vocab], contiguous
                chosen, _, lse = self._token_logprobs(rows, token_ids[w], with_rank=False)
                if k_max == 1 and all(params[i].greedy for i in wanted):  # a greedy row's top 1 is its own token
                    top_i, top_v = token_ids[w][:, None], chosen[:, None]
                elif k_max:
                    top_v, top_i = rows.topk(k_max)
                    top_v = top_v.float() - lse[:, None]
            else:
                lp = torch.log_softmax(logits[w].float(), dim=-1)  # [num_wanted, vocab]
                chosen = lp.gather(1, token_ids[w][:, None]).squeeze(1)  # [num_wanted]
                if k_max:
                    top_v, top_i = lp.topk(k_max)
        ids = token_ids.tolist()  # the step's host sync
        logprobs: list[dict[int, float] | None] = [None] * num_rows
        if wanted:
            chosen_l = chosen.tolist()
            top_i = top_i.tolist() if top_i is not None else None
            top_v = top_v.tolist() if top_v is not None else None
            for j, i in enumerate(wanted):
                entry = {ids[i]: chosen_l[j]}
                k = params[i].logprobs
                if k:
                    entry.update(zip(top_i[j][:k], top_v[j][:k]))
                logprobs[i] = entry
        return SamplerOutput(ids, logprobs)

    def _row_inputs(self, params: list[SamplingParams], output_positions: list[int] | None) -> torch.Tensor:
        """The random rows' [4, rows] float64 inputs (temperature, top-k, top-p, uniform) on the device, one copy."""
        n = len(params)
        host = np.empty((4, n), dtype=np.float64)
        host[0] = [p.temperature for p in params]
        host[1] = [p.top_k for p in params]
        host[2] = [p.top_p for p in params]
        host[3] = self._rng.random(n)
        seeded = [j for j, p in enumerate(params) if p.seed is not None]
        if seeded:
            pos = output_positions if output_positions is not None else [0] * n
            host[3, seeded] = seeded_uniforms(np.array([params[j].seed for j in seeded], dtype=np.uint64),
                                              np.array([pos[j] for j in seeded], dtype=np.uint64))
        return torch.from_numpy(host).to(self.device, non_blocking=True)

    def _draw(self, logits: torch.Tensor, params: list[SamplingParams],
              output_positions: list[int] | None) -> torch.Tensor:
        """[rows, vocab] logits of random rows -> [rows] int64 tokens drawn from their filtered distributions.

        Rows with top-k or top-p are drawn over their sorted row, the others over the row as it is: which one a
        row takes depends on its own parameters only (a uniform maps to a different token in each order), so a
        seeded row's token does not depend on whether another row in the batch asked for filtering."""
        cols = self._row_inputs(params, output_positions)  # [4, rows]
        filtered = [j for j, p in enumerate(params) if p.top_k or p.top_p < 1.0]
        if not filtered:
            return self._sample_plain(logits, cols[0].float(), cols[3])
        if len(filtered) == len(params):
            return self._draw_filtered_rows(logits, cols)
        plain = [j for j in range(len(params)) if j not in set(filtered)]
        f = torch.tensor(filtered, dtype=torch.int64).to(logits.device, non_blocking=True)
        q = torch.tensor(plain, dtype=torch.int64).to(logits.device, non_blocking=True)
        tokens = torch.empty(len(params), dtype=torch.int64, device=logits.device)
        tokens[f] = self._draw_filtered_rows(logits[f], cols[:, f])
        tokens[q] = self._sample_plain(logits[q], cols[0, q].float(), cols[3, q])
        return tokens

    def _draw_filtered_rows(self, logits: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] logits of rows with top-k / top-p, their [4, rows] inputs -> [rows] int64 tokens: the kernel
        family's draw where it has one, else the torch path."""
        if self._sample_filtered is not None:
            tokens = self._sample_filtered(logits, cols[0].float(), cols[1].to(torch.int64), cols[2].float(), cols[3])
            if tokens is not None:
                return tokens
        return _draw_filtered(logits.float() / cols[0].float()[:, None], cols, self.top_candidates)


def torch_sample_plain(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] logits, [rows] float32 temperatures (> 0), [rows] float64 uniforms -> [rows] int64 tokens drawn
    by inverse CDF from softmax(logits / temperature): rows without top-k / top-p, in torch ops (the oracle of
    ``ops.sample_plain``)."""
    return _inverse_cdf((logits.float() / temperature[:, None]).softmax(dim=-1), u)


def _draw_filtered(logits: torch.Tensor, cols: torch.Tensor, candidates: int) -> torch.Tensor:
    """[rows, vocab] temperature-scaled logits, [4, rows] inputs -> [rows] int64 tokens.

    ``candidates`` 0: every row sorted in full (on CUDA a sort is cheap and needs no host sync). Otherwise the rows
    are first drawn from their ``candidates`` best tokens, which is exact wherever those hold the whole filtered set
    (top-k <= candidates, or no top-k and the candidates' mass reaches top-p); the rows where they do not are drawn
    again over the full sort. On a CPU a full sort of 64 x 49k logits costs ~120 ms, the top 256 ~7 ms."""
    vocab = logits.shape[-1]
    if not candidates or candidates >= vocab:
        return _draw_sorted(logits, *logits.sort(dim=-1, descending=True), cols)
    top_k, top_p = cols[1], cols[2].float()
    cand, order = logits.topk(candidates, dim=-1)  # [rows, candidates], descending
    k = torch.where(top_k > 0, top_k, float(vocab)).to(torch.int64)  # 0 = no top-k
    # without top-k the probabilities are the whole row's: its normaliser, not the candidates'
    lse = torch.where(k <= candidates, torch.logsumexp(cand.masked_fill(
        torch.arange(candidates, device=logits.device)[None, :] >= k[:, None], float("-inf")), dim=-1),
        torch.logsumexp(logits, dim=-1))  # [rows]
    tokens = _draw_sorted(logits, cand, order, cols, lse)
    mass = torch.exp(cand - lse[:, None]).sum(dim=-1)  # the candidates' share of the row
    exact = (k <= candidates) | ((k >= vocab) & (mass >= top_p))
    redo = (~exact).nonzero().squeeze(1)
    if redo.numel():  # (a host sync: this path is the CPU's)
        sub = logits[redo]
        tokens[redo] = _draw_sorted(sub, *sub.sort(dim=-1, descending=True), cols[:, redo])
    return tokens


def _draw_sorted(logits: torch.Tensor, sorted_logits: torch.Tensor, order: torch.Tensor, cols: torch.Tensor,
                 lse: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k, then top-p (on the probabilities renormalised after top-k), then an inverse-CDF draw, over a row's
    best tokens in descending order: ``sorted_logits`` / ``order`` [rows, n] (n = vocab, or fewer candidates with
    ``lse`` [rows], the normaliser of the probabilities). Returns [rows] int64 token ids."""
    top_k, top_p, u = cols[1], cols[2].float(), cols[3]
    n = sorted_logits.shape[-1]
    ranks = torch.arange(n, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, float(logits.shape[-1])).to(torch.int64)  # 0 = no top-k
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    if lse is None:
        sorted_probs = sorted_logits.softmax(dim=-1)
    else:
        sorted_probs = torch.exp(sorted_logits - lse[:, None])
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of all better-ranked tokens
    sorted_probs.masked_fill_(mass_before >= top_p[:, None], 0.0)  # the top token always survives
    return order.gather(1, _inverse_cdf(sorted_probs, u)[:, None]).squeeze(1)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] unnormalised probabilities, [rows] float64 uniforms in [0, 1) -> [rows] int64: per row the
    first index whose cumulative mass exceeds ``u`` times the row's total (never an index of zero mass)."""
    cdf = probs.double().cumsum(dim=-1)  # [rows, vocab], non-decreasing
    total = cdf[:, -1:]  # [rows, 1]
    # strictly below the total even where u * total rounds up to it, so cdf[j-1] <= target < cdf[j]: p[j] > 0
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)
