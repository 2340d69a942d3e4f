"""Embedding lines -> ready token ids (truncated to the model's limit) or JobErrors, a chunk of lines at a time.

Mirrors ``jobs/preprocess.py`` so the validation pass, partitions and the resume stream (``jobs/scan.py``) serve
embedding jobs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.embed.embedder import Embedder
from tokenmill.embed.records import EMBEDDINGS_URL, EmbedRequest, embed_id_key, parse_embed_line
from tokenmill.jobs.records import JobError, check_batch_line


@dataclass
class EmbedPrepared:
    request: EmbedRequest
    token_ids: list[int]
    truncated: bool
    max_tokens: int = 0  # nothing is generated (the scan records it per line)


class EmbedPreprocessor:
    """``models``: set for a Batch API batch on the server (``serve/batches.py``): every line must be an OpenAI
    ``/v1/embeddings`` request, and its ``body.model``, if given, one of these names."""

    def __init__(self, embedder: Embedder, models: set[str] | None = None) -> None:
        self.embedder = embedder
        self.models = models
        self.vocab_size = embedder.net.word_embeddings.weight.shape[0] if not embedder.is_decoder else \
            embedder.net.embed_tokens.weight.shape[0]

    @staticmethod
    def id_key(record_id) -> str:
        return embed_id_key(record_id)

    def process(self, lines: list[tuple[int, bytes]]) -> list[tuple[int, EmbedPrepared | JobError]]:
        parsed: list[tuple[int, EmbedRequest | JobError]] = []
        for line_no, raw in lines:
            try:
                parsed.append((line_no, self._batch_check(parse_embed_line(raw, line_no))))
            except JobError as e:
                if self.models is not None and e.code == "unsupported_url":
                    e = JobError("mismatched_endpoint", f"line {line_no}: url does not match the batch's endpoint "
                                                        f"{EMBEDDINGS_URL}", e.record_id, True)
                parsed.append((line_no, e))
        texts = [(n, r) for n, r in parsed if isinstance(r, EmbedRequest) and isinstance(r.text, str)]
        tokenized = dict(zip((n for n, _ in texts), self.embedder.tokenize([r.text for _, r in texts])))
        out: list[tuple[int, EmbedPrepared | JobError]] = []
        for line_no, r in parsed:
            if isinstance(r, JobError):
                out.append((line_no, r))
                continue
            openai = r.kind == "openai"
            if r.dimensions is not None and r.dimensions != self.embedder.dim:
                out.append((line_no, JobError(
                    "dimensions_mismatch", f"line {line_no}: dimensions={r.dimensions}, but the model's embeddings "
                    f"have {self.embedder.dim}", r.record_id, openai)))
                continue
            tok = tokenized.get(line_no) or self.embedder.truncate_ids(r.text)
            if any(t < 0 or t >= self.vocab_size for t in tok.token_ids):
                out.append((line_no, JobError("invalid_text", f"line {line_no}: token ids must be in "
                                                              f"[0, {self.vocab_size})", r.record_id, openai)))
                continue
            out.append((line_no, EmbedPrepared(r, tok.token_ids, tok.truncated)))
        return out

    def _batch_check(self, r: EmbedRequest) -> EmbedRequest:
        if self.models is not None:  # (the url was checked by the parser)
            check_batch_line(r.line_no, r.record_id, r.kind == "plain", None, EMBEDDINGS_URL, r.model, self.models)
        return r
