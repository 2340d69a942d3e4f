"""Incremental detokenisation for streams.

Invariants: a multi-byte character split across tokens is never sent half (text ending in U+FFFD waits for the next
token); a stop string is never sent, not even partly (the last ``len(longest stop) - 1`` characters are held back
until the request finishes); and the pieces sent, concatenated, equal the final text of the request, the same text a
non-streamed request gets.

Each step decodes only a short window of tokens (vLLM's prefix/read offsets), so a stream costs O(n) decoding, not
O(n^2); the window starts with a few prompt tokens so tokenizers that drop a leading space at a slice boundary
(SentencePiece) decode the first output token right.
"""

from __future__ import annotations

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded output text so far
        self.sent = 0  # characters of ``text`` already handed out
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_ids: list[int]) -> str:
        """New output tokens -> the text that may be sent now (possibly empty)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        end = max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def finish(self, final_text: str) -> str:
        """The request ended with ``final_text`` (cut at its stop string): the rest of it."""
        delta = final_text[self.sent:]
        self.sent = len(final_text)
        return delta
