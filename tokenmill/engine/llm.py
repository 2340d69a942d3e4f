"""LLM: the offline API. ``LLM(model=..., **engine_options).generate(prompts, sampling_params)``.

Every prompt is checked before any compute; a bad batch raises one ValueError naming every offending index.
Outputs come back in input order whatever order the engine finished them in.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.loop import EngineLoop, Submission
from tokenmill.ops import Ops
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

Prompt = str | list[int]
Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | None = None, ops: Ops | None = None, **engine_options: Any) -> None:
        """``ops``: a kernel family to build the engine with (``tokenmill/ops/``) instead of the one
        ``attention_backend`` names (tests, benchmarks of another build)."""
        self.engine = LLMEngine(EngineConfig.from_dict({"model": model, **engine_options}), ops=ops)
        self.tokenizer = self.engine.tokenizer
        self._next_batch = 0

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    def close(self) -> None:
        """Stops the engine's tensor-parallel worker processes (with one rank there is nothing to stop). Also
        ``with LLM(...) as llm:``."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- public API
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and _is_token_list(prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        texts = [p if isinstance(p, str) else None for p in prompts]
        token_ids = self._tokenize(prompts)
        return self._run(token_ids, texts, sampling_params, use_tqdm)

    def chat(
        self,
        conversations: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Applies the model's chat template (with the generation prompt) to each conversation, then generates."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        texts = [self.apply_chat_template(c) for c in conversations]
        token_ids = self.tokenizer(texts, add_special_tokens=False).input_ids if texts else []
        return self._run(token_ids, texts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: Conversation) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with plain prompts")
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    # ---------------------------------------------------------------- internals
    def _tokenize(self, prompts: list[Any]) -> list[Any]:
        strings = [p for p in prompts if isinstance(p, str) and p]
        encoded = iter(self.tokenizer(strings).input_ids if strings else [])
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append(next(encoded) if p else [])
            else:
                out.append(p)
        return out

    def _run(self, token_ids, texts, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        params = self._check(token_ids, sampling_params)
        engine = self.engine
        order = range(len(token_ids))
        if engine.config.sort_by_length:
            order = sorted(order, key=lambda i: -len(token_ids[i]))
        loop = EngineLoop(engine)
        batch = f"generate{self._next_batch}"
        self._next_batch += 1
        # every prompt is computed (no dedupe: LLM.generate keeps vLLM's meaning of a list of prompts)
        loop.open_feed(batch, (Submission(str(i), token_ids[i], params[i], payload=i) for i in order), dedupe=False)
        results: list[RequestOutput | None] = [None] * len(token_ids)
        bar = tqdm(total=len(token_ids), desc="generate", unit="req", disable=not use_tqdm, dynamic_ncols=True)
        t0 = time.perf_counter()
        gen0 = engine.num_generated_tokens
        with bar:
            while loop.busy:
                for sub, out in loop.step().finished:
                    out.prompt = texts[sub.payload]
                    results[sub.payload] = out
                    bar.update(1)
                if use_tqdm:
                    rate = (engine.num_generated_tokens - gen0) / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix_str(f"{rate:.1f} gen tok/s", refresh=False)
        return results  # type: ignore[return-value]

    def _check(self, token_ids: list[Any], sampling_params) -> list[SamplingParams]:
        """Every problem with the batch, by index, before any compute."""
        n = len(token_ids)
        problems: list[str] = []
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            per_prompt = [sampling_params] * n
        else:
            per_prompt = list(sampling_params)
            if len(per_prompt) != n:
                raise ValueError(f"got {n} prompts but {len(per_prompt)} sampling parameter sets")
        params: list[SamplingParams] = []
        for i, (ids, sp) in enumerate(zip(token_ids, per_prompt)):
            if not isinstance(ids, list):
                problems.append(f"[{i}] prompt must be a string or a list of token ids, got {type(ids).__name__}")
            else:
                problem = self.engine.check_prompt(ids)
                if problem:
                    problems.append(f"[{i}] {problem}")
            try:
                params.append(_as_params(sp))
            except (ValueError, TypeError) as e:
                problems.append(f"[{i}] {e}")
        if problems:
            raise ValueError(f"{len(problems)} invalid input(s): " + "; ".join(problems))
        return params


def _as_params(sp: SamplingParams | dict | None) -> SamplingParams:
    if sp is None:
        return SamplingParams()
    if isinstance(sp, SamplingParams):
        return sp
    if isinstance(sp, dict):
        return SamplingParams.from_dict(sp)
    raise TypeError(f"sampling parameters must be SamplingParams or a dict, got {type(sp).__name__}")


def _is_token_list(x: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in x)
