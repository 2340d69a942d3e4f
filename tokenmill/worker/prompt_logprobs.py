"""The logprobs of the prompt tokens a step's chunks predict, for the requests that asked for them
(``SamplingParams.prompt_logprobs``), from the hidden states of the step's own forward pass.

The row of position p predicts token p + 1, so a chunk covering positions [s, s + n) gives the logprobs of tokens
s + 1 .. min(s + n, prompt_len - 1) (the last prompt token's row samples the first output token, as for any
request). The LM head runs on those rows 256 at a time and the ops object's ``token_logprobs`` reduces its logits
(in the head's dtype, widened exactly): each token's logprob, its rank among the whole vocabulary (1 = the most
likely) and the log-normaliser the top K are taken against. The scheduler appends them to the request
(``Request.add_prompt_logprobs`` skips positions already recorded, so a recomputed chunk adds nothing twice).

Under tensor parallelism the LM head's all-gather needs every rank: rank 0 sends the rows (``wanted_rows``) with
the step, and ranks 1..N-1 run the same head passes over them (``follow_rows``).
"""

from __future__ import annotations

import torch

ROWS_PER_PASS = 256  # bounds the [rows, vocab] float32 logits held at once


def wanted_rows(chunks, query_start_loc: list[int]) -> list[tuple]:
    """``chunks``: the step's ScheduledRequests in the flat batch's order (``query_start_loc`` their row offsets).
    Per chunk that asks: (request_id, first target position, its flat rows, the target token ids, K)."""
    wanted = []
    for i, s in enumerate(chunks):
        k = s.request.sampling_params.prompt_logprobs
        if k is None:
            continue
        start = s.num_computed_tokens
        end = min(start + s.num_scheduled_tokens, s.request.num_prompt_tokens - 1)
        if end > start:
            row0 = query_start_loc[i]
            wanted.append((s.request_id, start + 1, range(row0, row0 + end - start),
                           s.request.all_token_ids[start + 1:end + 1], k))
    return wanted


def flat_rows(wanted: list[tuple]) -> list[int]:
    return [r for w in wanted for r in w[2]]


@torch.inference_mode()
def follow_rows(model, hidden: torch.Tensor, rows: torch.Tensor) -> None:
    """A tensor-parallel worker's share: the LM head over ``rows`` in rank 0's passes (their all-gathers meet)."""
    for a in range(0, rows.numel(), ROWS_PER_PASS):
        model.compute_logits(hidden[rows[a:a + ROWS_PER_PASS]], as_float32=False)


@torch.inference_mode()
def prompt_logprobs(model, wanted: list[tuple], hidden: torch.Tensor) -> dict:
    """``wanted``: ``wanted_rows``'s; ``hidden`` [num_tokens, hidden]. Returns request_id -> (first token position,
    entries, ranks), where an entry is {the token: its logprob, each top-K token: its logprob}; {} when no chunk
    asks."""
    if not wanted:
        return {}
    rows = torch.tensor(flat_rows(wanted), dtype=torch.int64, device=hidden.device)
    targets = torch.tensor([t for w in wanted for t in w[3]], dtype=torch.int64, device=hidden.device)
    k_max = max(w[4] for w in wanted)
    chosen, ranks, top_v, top_i = [], [], [], []
    for a in range(0, rows.numel(), ROWS_PER_PASS):
        logits = model.compute_logits(hidden[rows[a:a + ROWS_PER_PASS]], as_float32=False)  # [<=256, vocab]
        lp, rank, lse = model.ops.token_logprobs(logits, targets[a:a + ROWS_PER_PASS])
        chosen.append(lp)
        ranks.append(rank)
        if k_max:
            top = logits.topk(k_max, dim=1)
            top_v.append(top.values.float() - lse[:, None])
            top_i.append(top.indices)
    chosen_l, ranks_l = torch.cat(chosen).tolist(), torch.cat(ranks).tolist()  # one read back for the step
    top_vl = torch.cat(top_v).tolist() if k_max else None
    top_il = torch.cat(top_i).tolist() if k_max else None
    out, j = {}, 0
    for rid, first, _, tgts, k in wanted:
        entries = []
        for t in tgts:
            e = {t: chosen_l[j]}
            if k:
                e.update(zip(top_il[j][:k], top_vl[j][:k]))
            entries.append(e)
            j += 1
        out[rid] = (first, entries, ranks_l[j - len(tgts):j])
    return out
