"""Output records of ``tokenmill run``: a plain result line, or an OpenAI Batch output line (``chat.completion`` /
``text_completion`` body with ``usage`` and, when the line asked for them, ``logprobs`` in OpenAI's shapes)."""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache

from tokenmill.jobs.records import JobRequest, id_key


def result_record(req: JobRequest, choices: list[tuple[str, str, dict | None]], prompt_tokens: int,
                  output_tokens: int, model_name: str, prompt_logprobs: list | None = None) -> dict:
    """``choices``: per sample, (text, finish_reason, its ``logprobs`` object or None), in index order (one unless
    the line asked for ``n`` > 1). A plain line with several samples gets ``completions`` / ``finish_reasons``
    lists instead of ``completion`` / ``finish_reason``. ``prompt_logprobs`` (vLLM's field, ``vllm_prompt_logprobs``)
    goes on every completions choice, or on a chat body, as vLLM places it."""
    if req.kind == "plain":
        rec = {"id": req.record_id}
        if len(choices) == 1:
            rec.update(completion=choices[0][0], finish_reason=choices[0][1])
        else:
            rec.update(completions=[c[0] for c in choices], finish_reasons=[c[1] for c in choices])
        rec.update(input_tokens=prompt_tokens, output_tokens=output_tokens)
        return rec
    digest = hashlib.sha256(str(req.record_id).encode()).hexdigest()
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
             "total_tokens": prompt_tokens + output_tokens}
    created = int(time.time())
    if req.kind == "openai_chat":
        body = {
            "id": f"chatcmpl-{digest[:29]}",
            "object": "chat.completion",
            "created": created,
            "model": model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish, "logprobs": lp} for i, (text, finish, lp) in enumerate(choices)],
            "usage": usage,
        }
        if prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs
    else:
        body = {
            "id": f"cmpl-{digest[:29]}",
            "object": "text_completion",
            "created": created,
            "model": model_name,
            "choices": [{"index": i, "text": text, "finish_reason": finish, "logprobs": lp,
                         **({"prompt_logprobs": prompt_logprobs} if prompt_logprobs is not None else {})}
                        for i, (text, finish, lp) in enumerate(choices)],
            "usage": usage,
        }
    return {
        "id": f"batch_req_{digest[:32]}",
        "custom_id": req.record_id,
        "response": {"status_code": 200, "request_id": f"req_{digest[32:64]}", "body": body},
        "error": None,
    }


def output_id_key(record: dict) -> str:
    """The id a written output record answers (custom_id for OpenAI records)."""
    return id_key(record["custom_id"] if "custom_id" in record else record["id"])


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet (printable stand-ins for the 256 byte values)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for: exact for byte-level BPE vocabularies (a token may be part of a character),
    else the UTF-8 of its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    table = _byte_decoder()
    if isinstance(piece, str) and piece and all(ch in table for ch in piece):
        return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def openai_logprobs(kind: str, token_ids: list[int], steps: list[dict[int, float]], k: int, tokenizer) -> dict:
    """The engine's per-token logprobs (``steps[i]``: the sampled token's logprob and the ``k`` most likely tokens')
    in the shape of OpenAI's chat (``content``) or completions (``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
    ``text_offset``) ``logprobs`` object."""
    def text_of(t: int) -> str:
        return token_bytes(tokenizer, t).decode("utf-8", errors="replace")

    def top(step: dict[int, float]) -> list[tuple[int, float]]:  # the sampled token is among them only if in the top k
        return sorted(step.items(), key=lambda kv: -kv[1])[:k]

    if kind == "openai_chat":
        content = []
        for t, step in zip(token_ids, steps):
            b = token_bytes(tokenizer, t)
            alternatives = [{"token": text_of(a), "logprob": lp, "bytes": list(token_bytes(tokenizer, a))}
                            for a, lp in top(step)]
            content.append({"token": b.decode("utf-8", errors="replace"), "logprob": step.get(t, 0.0),
                            "bytes": list(b), "top_logprobs": alternatives})
        return {"content": content, "refusal": None}
    tokens, offsets, pos = [], [], 0
    for t in token_ids:
        tokens.append(text_of(t))
        offsets.append(pos)
        pos += len(tokens[-1])
    # a step of None (an echoed prompt's first token, which nothing predicts) is null in both lists, as OpenAI's
    tops = [None if step is None else {text_of(a): lp for a, lp in top(step)} for step in steps]
    return {"tokens": tokens,
            "token_logprobs": [None if step is None else step.get(t, 0.0) for t, step in zip(token_ids, steps)],
            "top_logprobs": tops, "text_offset": offsets}


def choice_contents(item, out, tokenizer) -> tuple[list[tuple[str, str, dict | None]], int]:
    """A finished request's choices as an OpenAI body shows them: per sample (text, finish_reason, the ``logprobs``
    object or None), and the completion tokens of them all. With completions' ``echo`` the prompt comes first in
    each (its text; with logprobs, its tokens' logprobs, the first one null); a score-only echo (``max_tokens: 0``)
    leaves out the one token the request generated. ``item``: the Prepared request; ``out``: its RequestOutput."""
    req, k = item.request, item.params.logprobs
    choices, completion_tokens = [], 0
    prompt_text = None
    if req.echo:
        prompt_text = req.prompt if isinstance(req.prompt, str) else tokenizer.decode(req.prompt)
    for sample in out.outputs:
        gen_ids, gen_steps, text = sample.token_ids, sample.logprobs, sample.text
        if req.score_only:
            gen_ids, gen_steps, text = [], [], ""
        completion_tokens += len(gen_ids)
        lp = None
        if not req.echo:
            if k is not None and gen_steps is not None:
                lp = openai_logprobs(req.kind, gen_ids, gen_steps, k, tokenizer)
            choices.append((text, sample.finish_reason, lp))
            continue
        if k is not None:
            prompt_steps = out.prompt_logprobs or [None] * len(item.token_ids)
            lp = openai_logprobs(req.kind, list(item.token_ids) + list(gen_ids),
                                 list(prompt_steps) + list(gen_steps or []), k, tokenizer)
        choices.append((prompt_text + text, sample.finish_reason, lp))
    return choices, completion_tokens


def vllm_prompt_logprobs(item, out, tokenizer) -> list | None:
    """vLLM's ``prompt_logprobs`` response field, for a line whose body asked for it (K): per prompt token, None for
    the first, else ``{token id: {"logprob", "rank", "decoded_token"}}`` for the token itself and the K most likely
    ones (ranks 1 = most likely); None when the line did not ask."""
    k = item.request.prompt_logprobs
    if k is None or out.prompt_logprobs is None:
        return None
    rows: list = [None]
    for i in range(1, len(item.token_ids)):
        step, tok = out.prompt_logprobs[i], item.token_ids[i]
        top = sorted(step.items(), key=lambda kv: -kv[1])[:k]
        ranked = {t: r for r, (t, _) in enumerate(top, 1)}
        ranked[tok] = out.prompt_token_ranks[i]
        rows.append({str(t): {"logprob": step[t], "rank": r, "decoded_token": tokenizer.decode([t])}
                     for t, r in ranked.items()})
    return rows
