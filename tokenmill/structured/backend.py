"""The grammar engine behind structured outputs (llguidance), and the batched token mask of a step.

Why llguidance (measured side by side with xgrammar on SmolLM2's 49,152-token vocabulary: ``benchmarks/
grammar_engines.py``, BENCHMARKS.md "Structured outputs"): xgrammar fills a mask ~3.6x faster, but compiles a
schema ~100x slower (139 ms against 1.3 ms for the benchmark's schema). A batch file of OpenAI lines often carries a
schema per line, so compile time multiplies by the row count. llguidance also has no dependencies (xgrammar pulls in
triton, hundreds of megabytes, on every Linux install) and reads GBNF (llama.cpp's grammar syntax) and Lark. Its fill
cost is overlapped with the model's forward pass (``StructuredState.start_masks``). The mask is applied by our own
batched operation (numpy bit unpacking and one ``masked_fill_``): both libraries' CPU helpers were slower.

Invariants:
- ``GrammarBackend.compile(spec)`` is cached by the spec's content (``StructuredOutputs`` is hashable): each distinct
  schema, regex, choice list or grammar is compiled once per backend (least recently used ones dropped past
  ``CACHE_SIZE``). An invalid one raises ValueError with the engine's message, at add time (or in a job's
  validation pass), never in a step.
- ``StructuredState`` holds one matcher per constrained request that has sampled; its state is the request's output
  tokens so far. Preemption under ``recompute`` keeps a request's output tokens, so its matcher stays valid and needs
  no rollback; a finished or aborted request's matcher is dropped at the next step (as its seeded generator is).
- In a step, only the rows of constrained requests are touched: an unconstrained batch pays one scan of its params.
  The masks are filled while the model runs (``start_masks``) and applied to its logits after (``apply_masks``).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.structured.params import StructuredOutputs

CACHE_SIZE = 1024  # distinct compiled constraints kept per backend
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    import llguidance
    import llguidance.hf

    return llguidance


class GrammarBackend:
    """Compiles constraints for one tokenizer and vocabulary (``vocab_size`` is the model's: the logits' width)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids) -> None:
        self.vocab_size = vocab_size
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids)
        self._tokenizer = None  # built on first use (~0.3 s)
        self._compiled: OrderedDict[StructuredOutputs, str] = OrderedDict()

    @property
    def ll_tokenizer(self):
        if self._tokenizer is None:
            llg = _llguidance()
            self._tokenizer = llg.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self.vocab_size,
                                                    eos_token=self._eos or None)
        return self._tokenizer

    def compile(self, spec: StructuredOutputs) -> str:
        """The engine's grammar for ``spec``; raises ValueError saying why it is invalid."""
        hit = self._compiled.get(spec)
        if hit is not None:
            self._compiled.move_to_end(spec)
            return hit
        llg = _llguidance()
        try:
            grammar = self._grammar_text(llg, spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"invalid {spec.kind}: {e}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise ValueError(f"invalid {spec.kind}: {_short(messages[0])}")
        self._compiled[spec] = grammar
        if len(self._compiled) > CACHE_SIZE:
            self._compiled.popitem(last=False)
        return grammar

    @staticmethod
    def _grammar_text(llg, spec: StructuredOutputs) -> str:
        from llguidance._grammar_from import grammar_from

        if spec.json is not None or spec.json_object:
            # one space after "," and ":" (as json.dumps writes), no other whitespace: a model cannot pad forever
            return llg.LLMatcher.grammar_from_json_schema(spec.json or '{"type": "object"}', defaults=JSON_OPTIONS)
        if spec.regex is not None:
            return llg.LLMatcher.grammar_from_regex(spec.regex)
        if spec.choice is not None:
            return grammar_from("choice", json.dumps(list(spec.choice)))
        return grammar_from("grammar", spec.grammar)  # GBNF / EBNF, or Lark

    def matcher(self, spec: StructuredOutputs):
        llg = _llguidance()
        m = llg.LLMatcher(self.ll_tokenizer, self.compile(spec), log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {spec.kind}: {_short(m.get_error())}")
        return m


def _short(message: str) -> str:
    message = " ".join(str(message).split())
    return message[:300] + ("..." if len(message) > 300 else "")


class StructuredState:
    """The step's batched mask of a runner's constrained requests. Each request's matcher lives in its runner record
    (``worker/block_table.RequestState.matcher``, made on its first sampling step), so it goes with the request.

    A step's masks depend only on tokens already sampled, so ``start_masks`` fills them in a background thread
    (llguidance releases the GIL, as torch does) while the model runs; ``apply_masks`` waits for them and masks the
    logits."""

    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._executor = None  # llguidance's thread pool: the masks of a step are filled in parallel
        self._thread = None  # a one-thread pool: the fill overlaps the model's forward pass

    def start_masks(self, states: list, params) -> "PendingMasks | None":
        """Starts filling the masks of the constrained requests among those about to sample (None: none is).
        ``states``: their records (anything with a ``matcher`` attribute), ``params``: their sampling params."""
        rows = [i for i, p in enumerate(params) if p.structured is not None]
        if not rows:
            return None
        words = (self.backend.vocab_size + 31) // 32
        bitmask = np.full((len(rows), words), -1, dtype=np.int32)  # [rows, vocab / 32], bit set = allowed
        live = []
        for j, i in enumerate(rows):
            m = states[i].matcher
            if m is None:
                m = states[i].matcher = self.backend.matcher(params[i].structured)
            if not m.is_stopped():
                live.append((m, j))
            else:  # the grammar is complete: only its end (EOS) may follow
                bits = bitmask.view(np.uint32)
                bits[j] = 0
                for t in self.backend.ll_tokenizer.eos_tokens:
                    bits[j, t // 32] |= np.uint32(1 << (t % 32))
        future = None
        if live:
            if self._executor is None:
                from concurrent.futures import ThreadPoolExecutor

                self._executor = _llguidance().LLExecutor()
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokenmill-masks")
            future = self._thread.submit(self._executor.unsafe_compute_mask_ptr, live, bitmask.ctypes.data,
                                         words * 4, len(rows))
        return PendingMasks(rows, bitmask, future)

    def apply_masks(self, logits: torch.Tensor, pending: "PendingMasks | None") -> list[int]:
        """Masks, in place, the logits rows of constrained requests to the tokens their grammar allows next;
        returns those rows. logits: [num_rows, vocab], float32 or the model's dtype."""
        if pending is None:
            return []
        if pending.future is not None:
            pending.future.result()
        rows = pending.rows
        num_rows, vocab = logits.shape
        # the packed words go to the device (32x fewer bytes than a bool mask) and are unpacked there
        words = torch.from_numpy(pending.bitmask).to(logits.device, non_blocking=True)  # [rows, vocab / 32] int32
        shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
        bits = (words[:, :, None] >> shifts) & 1  # [rows, vocab / 32, 32]: bit b of word w is token 32 w + b
        blocked = (bits.reshape(len(rows), -1)[:, :vocab] == 0)  # [rows, vocab]
        if len(rows) == num_rows:
            logits.masked_fill_(blocked, float("-inf"))
        else:  # only the constrained rows are gathered, masked and put back
            idx = torch.tensor(rows, dtype=torch.int64).to(logits.device, non_blocking=True)
            logits[idx] = logits[idx].masked_fill_(blocked, float("-inf"))
        return rows

    def accept(self, states: list, rows: list[int], token_ids: list[int]) -> None:
        """Advances the matchers of the constrained rows by the tokens just sampled."""
        for i in rows:
            m = states[i].matcher
            if not m.is_stopped():
                m.consume_token(token_ids[i])


@dataclass
class PendingMasks:
    rows: list[int]  # the sampling rows that are constrained
    bitmask: np.ndarray  # [len(rows), vocab / 32] int32, being filled by ``future``
    future: object | None
