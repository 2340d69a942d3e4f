"""SamplingParams: how one request picks its next tokens and when it stops.

Invariants:
- An instance is frozen and valid: every out-of-range value is rejected at construction with a ValueError that
  names every offending field, so nothing downstream re-checks.
- ``temperature == 0`` means greedy; ``top_k``/``top_p``/``seed`` are then irrelevant.
- A request with a ``seed`` draws from its own generator, so its tokens do not depend on the rest of the batch.
- ``n`` samples are returned; ``best_of`` (>= n, default n) are drawn and the n with the highest mean logprob per
  token kept. Sample i of a seeded request draws with ``sample_seed(seed, i)`` (sample 0 with the seed itself, so
  n = 1 gives the first sample of n > 1), so a seeded request stays reproducible (engine/parallel_sampling.py).
- ``structured`` constrains the output to a JSON schema, any JSON object, a regex, a choice or a grammar
  (``tokenmill.structured``); a dict such as ``{"json": {...}}`` is converted. Whether the schema or grammar compiles
  is checked when the request is added (or in a job's validation pass), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tokenmill.structured.params import StructuredOutputs

MAX_LOGPROBS = 20
MAX_SAMPLES = 128  # n and best_of (OpenAI's limit for n)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token (0 = only the sampled one)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (with its rank), computed
    # during the request's own prefill (such a request takes no prefix-cache hits: their logits were never computed)
    structured: StructuredOutputs | None = None  # what the output must match (None: free text)
    n: int = 1  # samples returned
    best_of: int | None = None  # samples drawn (None: n); the best n by mean logprob per token are returned
    lora: str | None = None  # the LoRA adapter this request runs with (a name the engine loaded); None = base model

    def __post_init__(self) -> None:
        # Accept a single string / lists for convenience; store tuples so the object stays hashable and frozen.
        # Values of the wrong type are kept as given, for _problems() to name them.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        structured_problem = None
        if self.structured is not None:
            try:
                object.__setattr__(self, "structured", StructuredOutputs.from_value(self.structured))
            except (ValueError, TypeError) as e:
                structured_problem = str(e)
        problems = self._problems()
        if structured_problem:
            problems.append(structured_problem)
        elif self.structured is not None and self.ignore_eos:
            problems.append("structured outputs end where the grammar ends: ignore_eos cannot be combined with them")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        p = []

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            p.append(f"max_tokens must be an integer >= 1, got {_shown(self.max_tokens)}")
        if not is_num(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            p.append(f"temperature must be a number in [0, 100], got {_shown(self.temperature)}")
        if not is_int(self.top_k) or self.top_k < 0:
            p.append(f"top_k must be an integer >= 0 (0 disables it), got {_shown(self.top_k)}")
        if not is_num(self.top_p) or not 0.0 < self.top_p <= 1.0:
            p.append(f"top_p must be a number in (0, 1], got {_shown(self.top_p)}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            p.append(f"seed must be an integer in [0, 2^63), got {_shown(self.seed)}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            p.append(f"stop must be a non-empty string or a list of them, got {_shown(self.stop)}")
        if not isinstance(self.stop_token_ids, tuple) or not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            p.append(f"stop_token_ids must be a list of non-negative integers, got {_shown(self.stop_token_ids)}")
        if not isinstance(self.ignore_eos, bool):
            p.append(f"ignore_eos must be a boolean, got {_shown(self.ignore_eos)}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            p.append(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_shown(self.logprobs)}")
        if self.prompt_logprobs is not None and (not is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            p.append(f"prompt_logprobs must be an integer in [0, {MAX_LOGPROBS}], got {_shown(self.prompt_logprobs)}")
        if not is_int(self.n) or not 1 <= self.n <= MAX_SAMPLES:
            p.append(f"n must be an integer in [1, {MAX_SAMPLES}], got {_shown(self.n)}")
        elif self.best_of is not None and (not is_int(self.best_of) or not self.n <= self.best_of <= MAX_SAMPLES):
            p.append(f"best_of must be an integer in [n, {MAX_SAMPLES}] (n = {self.n}), got {_shown(self.best_of)}")
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            p.append(f"lora must be an adapter's name (a non-empty string), got {_shown(self.lora)}")
        return p

    @property
    def num_samples(self) -> int:
        """How many samples run: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        """Build from a plain dict; an unknown key is a ValueError naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)


# what a scoring request asks for: its prompt's logprobs, and one greedy token that nobody reads (the engine's
# score_batch and a score job's rows share it)
SCORE_PARAMS = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)


def _shown(value: Any) -> str:
    """A value as an error message shows it: its type and a short repr ("str 'abc'", "int 5", "list [1, 2]")."""
    try:
        text = repr(list(value) if isinstance(value, tuple) else value)
    except ValueError:  # an integer too long to print
        text = "(too long to show)"
    name = "list" if isinstance(value, tuple) else type(value).__name__
    return f"{name} {text[:40]}{'...' if len(text) > 40 else ''}"
