"""LLMEngine: requests in, finished RequestOutputs out, one scheduler step at a time.

The engine wires the scheduler (pure Python) to the model runner and does the output processing: stop strings
(the scheduler asks ``_stop_string_of``, a check on a short detokenised tail, only for requests that have stop
strings) and one bulk detokenisation of every request finished in a step. Token ids are collected per request; text is never built per step.
A request with structured outputs has its constraint compiled when it is added (``grammars``, shared with a job's
validation pass so each distinct constraint compiles once): an invalid one is a ValueError there, never in a step.
"""

from __future__ import annotations

import dataclasses
import logging

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmill.kernels.cpu_kernel import build_seconds_so_far
from tokenmill.config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.priority import ONLINE
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.engine.model_info import ModelInfo, resolve_device
from tokenmill.engine.parallel_sampling import CHILD_SEP, ParentRequest
from tokenmill.model.loader import load_model
from tokenmill.model.weights import weight_bytes
from tokenmill.ops import Ops, make_ops
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import SCORE_PARAMS, SamplingParams
from tokenmill.structured.backend import GrammarBackend
from tokenmill.worker.memory import plan_num_blocks, plan_num_swap_blocks
from tokenmill.worker.model_runner import ModelRunner


@dataclass
class StepResult:
    new_token_ids: dict[str, int]  # request id -> the token this step sampled for it (a request with n > 1: each
    # sample's, under its child id "{request_id}::{i}", see parent_of)
    scheduled_ids: list[str]  # requests that ran in this step (a request's first one ends its queue time)
    new_logprobs: dict[str, dict[int, float]]  # for the requests that asked for logprobs: their new token's
    num_scheduled_tokens: int
    finished: list[RequestOutput]


def _profiled_activations(model, config: EngineConfig, dtype: torch.dtype, device: torch.device) -> int | None:
    """The profiling pass's measure of one full step's activations (worker/profile.py); None (the shape estimate)
    with a warning if it fails, so a problem in it never stops an engine from starting."""
    from tokenmill.worker.memory import kv_cache_dtype
    from tokenmill.worker.profile import measure_activation_bytes

    try:
        return measure_activation_bytes(model, config, kv_cache_dtype(config, dtype), device)
    except Exception as e:  # noqa: BLE001 (any failure: fall back, say so)
        logging.getLogger("tokenmill").warning("the profiling pass failed (%s: %s); the KV pool is sized from an "
                                               "estimate of the activations", type(e).__name__, e)
        torch.cuda.empty_cache()
        return None


class LLMEngine:
    def __init__(self, config: EngineConfig, grammars: GrammarBackend | None = None, ops: Ops | None = None,
                 info: ModelInfo | None = None) -> None:
        """``grammars``: a GrammarBackend made for this model's tokenizer (a job's, already holding the constraints
        its validation pass compiled); by default the engine makes its own. ``ops``: the kernel family
        (``tokenmill/ops/``); by default the one ``config.attention_backend`` names on the device. ``info``: the
        model as a job already read it (``ModelInfo.read``: tokenizer, config, adapters), so nothing is read twice;
        it must describe ``config.model``."""
        config.check()
        t0 = time.perf_counter()
        self.device = resolve_device(config.device)
        if config.num_threads and self.device.type == "cpu":
            torch.set_num_threads(config.num_threads)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        self.tp_workers = None
        if config.tensor_parallel_size > 1:  # ranks 1..N-1 in processes of their own; this one is rank 0
            from tokenmill.parallel.workers import rank_device, start_workers

            self.device = rank_device(self.device, 0)
            self.tp_workers = start_workers(config, self.device)
        try:
            self._build(config, cache_dir, ops, grammars, info, t0)
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, cache_dir: Path | None, ops: Ops | None, grammars: GrammarBackend | None,
               info: ModelInfo | None, t0: float) -> None:
        from tokenmill.model.loader import resolve_dtype, resolve_model_path
        from tokenmill.parallel.group import SINGLE

        if info is not None and info.path != resolve_model_path(config.model):
            raise ValueError(f"the ModelInfo given describes {info.path}, not the engine's model {config.model}")
        tp = self.tp_workers.tp if self.tp_workers is not None else SINGLE
        self.ops = ops if ops is not None else make_ops(config.attention_backend, self.device)  # chosen once
        loaded = load_model(config.model, config.dtype, self.device, config.max_model_len, cache_dir,
                            config.quantization, config.load_format, config.cpu_gemm, self.ops,
                            config.activation_dtype, tp, config.lora_adapters,
                            tokenizer=info.tokenizer if info is not None else None,
                            adapters=info.adapters if info is not None else None)
        config = config.resolve(loaded.model_config.max_position_embeddings)
        if loaded.quantization != config.quantization:  # a GPTQ/AWQ checkpoint's int4: the config says so
            config = dataclasses.replace(config, quantization=loaded.quantization)
        model_dtype = resolve_dtype(config.dtype, self.device)
        dtype = loaded.model.activation_dtype  # the activations' and the KV cache's
        # what the engine is running, in one place (engine.config, .tokenizer, ... are views of it)
        self.info = ModelInfo(config, loaded.path, loaded.hf_dir, loaded.model_config, loaded.tokenizer,
                              loaded.eos_token_ids, self.device, model_dtype, list(loaded.adapters),
                              dtype if dtype != model_dtype else None)
        self._long_rope_from = loaded.model_config.rope.long_rope_from()  # keys long prompts' cached blocks
        # one rank's share of the KV cache: its KV heads (every rank holds every block, for its heads)
        rank_mc = dataclasses.replace(self.model_config,
                                      num_key_value_heads=self.model_config.num_key_value_heads // tp.size)
        activations = None
        if self.device.type == "cuda" and self.config.num_kv_blocks is None:
            activations = _profiled_activations(loaded.model, self.config, dtype, self.device)
        self.num_kv_blocks = plan_num_blocks(self.config, rank_mc, dtype, self.device, activations)
        self.num_swap_blocks = plan_num_swap_blocks(self.config, rank_mc, dtype)
        if self.tp_workers is not None:
            self.tp_workers.send_num_blocks(self.num_kv_blocks, self.num_swap_blocks, self.device)
        self.kv_cache_manager = KVCacheManager(self.num_kv_blocks, self.config.block_size,
                                               self.config.enable_prefix_caching, self.num_swap_blocks)
        self.scheduler = Scheduler(self.config, self.kv_cache_manager, self._stop_string_of)
        self.grammars = grammars or GrammarBackend(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(self.config, loaded.model, self.num_kv_blocks, self.device, self.grammars,
                                  self.num_swap_blocks)
        if self.tp_workers is not None:
            self.tp_workers.runner = self.runner
        self.weight_bytes = weight_bytes(loaded.model)
        self.load_seconds = time.perf_counter() - t0
        self.kernel_build_seconds = build_seconds_so_far()  # a one-off per machine, inside load_seconds
        self.num_generated_tokens = 0
        self.num_prompt_tokens_done = 0
        self._parents: dict[str, ParentRequest] = {}  # requests with several samples, by id (parallel_sampling.py)

    # ---------------------------------------------------------------- the model, as ``info`` holds it
    @property
    def config(self) -> EngineConfig:
        """The configuration, resolved against the model."""
        return self.info.config

    @property
    def model_config(self):
        return self.info.model_config

    @property
    def tokenizer(self):
        return self.info.tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.info.eos_token_ids

    @property
    def dtype(self) -> torch.dtype:
        return self.info.dtype

    @property
    def model_path(self) -> Path:
        return self.info.path

    def close(self) -> None:
        """Stops the tensor-parallel workers (nothing to do with one rank). The engine cannot step afterwards."""
        if self.tp_workers is not None:
            self.tp_workers.close()

    # ---------------------------------------------------------------- requests
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                    priority: int = ONLINE) -> None:
        """Queues a request; with ``n > 1`` or ``best_of`` it runs as that many samples sharing the prompt's KV
        (engine/parallel_sampling.py) and finishes as one RequestOutput. ``priority``: ``core.priority.BATCH`` for a
        row that only fills what online requests leave. A ValueError for a bad prompt, a constraint that does not
        compile, or an id already in the engine."""
        problem = self.check_prompt(prompt_token_ids)
        if problem:
            raise ValueError(f"request {request_id!r}: {problem}")
        if request_id in self.scheduler.requests or request_id in self._parents:
            raise ValueError(f"request {request_id!r} is already in the engine")
        lora = sampling_params.lora
        if lora is not None and (self.runner.model.loras is None or lora not in self.runner.model.loras.slots):
            loaded = sorted(self.runner.model.loras.slots) if self.runner.model.loras is not None else []
            raise ValueError(f"request {request_id!r}: unknown LoRA adapter {lora!r}; loaded: "
                             f"{', '.join(loaded) or 'none (start the engine with lora_adapters / --lora)'}")
        if sampling_params.structured is not None:
            try:
                self.grammars.compile(sampling_params.structured)
            except ValueError as e:
                raise ValueError(f"request {request_id!r}: {e}") from None
        if sampling_params.num_samples == 1:
            self.scheduler.add_request(Request(request_id, prompt_token_ids, sampling_params, self.eos_token_ids,
                                               priority, self._long_rope_from))
            return
        parent = ParentRequest(request_id, sampling_params)
        clash = [c for c in parent.child_ids if c in self.scheduler.requests]
        if clash:
            raise ValueError(f"request {request_id!r}: its sample id {clash[0]!r} is already in the engine")
        self._parents[request_id] = parent
        for i, cid in enumerate(parent.child_ids):
            self.scheduler.add_request(Request(cid, prompt_token_ids, parent.child_params(i), self.eos_token_ids,
                                               priority, self._long_rope_from))

    def parent_of(self, request_id: str) -> tuple[str, int]:
        """(the request, the sample's index) a StepResult id stands for: a child id's parent, else (the id, 0)."""
        if not self._parents:  # the common case, once per new token in the server's loop
            return request_id, 0
        head, sep, tail = request_id.rpartition(CHILD_SEP)
        if sep and head in self._parents:
            return head, int(tail)
        return request_id, 0

    def _engine_ids(self, request_ids: list[str]) -> list[str]:
        """Request ids as the scheduler knows them: a request with several samples stands for its children."""
        out = []
        for rid in request_ids:
            parent = self._parents.get(rid)
            out.extend(parent.child_ids if parent is not None else [rid])
        return out

    def check_prompt(self, prompt_token_ids: list[int]) -> str | None:
        """Why a prompt cannot run, or None. Used to find every bad input before any compute."""
        n = len(prompt_token_ids)
        if n == 0:
            return "empty prompt"
        if n >= self.config.max_model_len:
            return (
                f"prompt has {n} tokens but max_model_len is {self.config.max_model_len} "
                f"(a prompt needs at least one free position to generate into)"
            )
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            return f"token ids out of the vocabulary range [0, {vocab}): {bad[:5]}"
        return None

    def abort_request(self, request_ids: list[str]) -> None:
        """Drops the requests (every sample of one with n > 1); nothing is returned for them."""
        ids = self._engine_ids(request_ids)
        for rid in request_ids:
            self._parents.pop(rid, None)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    def reset_prefix_cache(self) -> None:
        """Forgets the prefix cache (between benchmark runs; only while no request runs)."""
        self.kv_cache_manager.reset_prefix_cache()

    def score(self, token_ids: list[int]) -> list[float]:
        """The log-probability of each token after the first given the ones before it (``tokenmill eval``'s
        perplexity). One request with ``prompt_logprobs`` through the normal steps (``score_batch``)."""
        return self.score_batch([token_ids])[0]

    def score_batch(self, prompts: list[list[int]]) -> list[list[float]]:
        """``score`` for many token lists at once: requests with ``prompt_logprobs=0`` (and one greedy token, not
        returned) batched and chunked like any others. It steps the engine until they finish, so it runs only while
        no other request is in the engine. Each list needs 2 to max_model_len - 1 tokens."""
        limit = self.config.max_model_len - 1
        bad = [i for i, p in enumerate(prompts) if not 2 <= len(p) <= limit]
        if bad:
            raise ValueError(f"score() needs 2 to max_model_len - 1 = {limit} tokens per list; list {bad[0]} has "
                             f"{len(prompts[bad[0]])}")
        if self.has_unfinished_requests():
            raise RuntimeError("score() steps the engine itself: call it while no request is in the engine")
        for i, p in enumerate(prompts):
            self.add_request(f"__score__{i}", p, SCORE_PARAMS)
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                done[out.request_id] = out
        return [[entry[t] for entry, t in zip(done[f"__score__{i}"].prompt_logprobs[1:], p[1:])]
                for i, p in enumerate(prompts)]

    def num_computed_tokens(self, request_id: str) -> int:
        """Tokens of an unfinished request computed so far (prompt and output, summed over its samples; 0 once
        finished or unknown)."""
        reqs = (self.scheduler.requests.get(rid) for rid in self._engine_ids([request_id]))
        return sum(r.num_computed_tokens for r in reqs if r is not None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def num_unfinished_requests(self) -> int:
        """Requests added and not yet finished (running or waiting; each sample of one with n > 1 counts)."""
        return self.scheduler.num_unfinished_requests

    @property
    def num_running_requests(self) -> int:
        """Requests admitted and holding KV blocks."""
        return self.scheduler.num_running_requests

    @property
    def num_waiting_requests(self) -> int:
        """Requests added and not admitted yet (or preempted and waiting to be recomputed)."""
        return self.scheduler.num_unfinished_requests - self.scheduler.num_running_requests

    def num_waiting_at(self, priority: int) -> int:
        """Requests of one priority class (core/priority.py) waiting to be admitted."""
        return self.scheduler.waiting.count(priority)

    @property
    def stats(self):
        return self.scheduler.stats

    # ---------------------------------------------------------------- the loop
    def step(self) -> list[RequestOutput]:
        """Runs one scheduler step; returns the requests it finished (stopped or out of length)."""
        return self.step_with_deltas().finished

    def step_with_deltas(self) -> StepResult:
        """Runs one scheduler step; returns every request's new token (for streaming) and the finished outputs."""
        sched_out = self.scheduler.schedule()
        runner_out = self.runner.execute(sched_out)
        finished = self.scheduler.update_from_output(sched_out, runner_out)
        self.num_generated_tokens += len(runner_out.sampled_token_ids)
        self.num_prompt_tokens_done += sum(
            s.num_scheduled_tokens for s in sched_out.scheduled if s.num_computed_tokens < s.request.num_prompt_tokens
        )
        return StepResult(new_token_ids=runner_out.sampled_token_ids,
                          scheduled_ids=[s.request_id for s in sched_out.scheduled],
                          new_logprobs=runner_out.logprobs,
                          num_scheduled_tokens=sched_out.total_num_scheduled_tokens,
                          finished=self._make_outputs(finished))

    @property
    def kv_cache_usage(self) -> float:
        """Share of the KV cache's blocks held by requests, in [0, 1]."""
        kv = self.kv_cache_manager
        return 1.0 - kv.num_free_blocks / kv.num_blocks if kv.num_blocks else 0.0

    def _stop_string_of(self, req: Request) -> str | None:
        """The stop string the request's output ends with now, from a short detokenised tail (the scheduler calls
        this after each new token of a request that has stop strings)."""
        stops = req.sampling_params.stop
        window = max(len(x) for x in stops) + 2  # each token adds at least one character
        tail = self.tokenizer.decode(req.output_token_ids[-window:], skip_special_tokens=True)
        return next((x for x in stops if x in tail), None)

    def _make_outputs(self, finished: list[Request]) -> list[RequestOutput]:
        if not finished:
            return []
        texts = self.tokenizer.batch_decode([r.output_token_ids for r in finished], skip_special_tokens=True)
        outputs = []
        for req, text in zip(finished, texts):
            if isinstance(req.stop_reason, str):
                text = text[: text.find(req.stop_reason)] if req.stop_reason in text else text
            cumulative = None
            if req.logprobs is not None:
                cumulative = sum(step.get(t, 0.0) for step, t in zip(req.logprobs, req.output_token_ids))
            sample = CompletionOutput(0, text, req.output_token_ids, req.finish_reason.value, req.stop_reason,
                                      req.logprobs, cumulative)
            out = RequestOutput(
                request_id=req.request_id,
                prompt=None,
                prompt_token_ids=req.prompt_token_ids,
                outputs=[sample],
                prompt_logprobs=req.prompt_logprobs,
                prompt_token_ranks=req.prompt_ranks,
                num_preemptions=req.num_preemptions,
                num_generated_tokens=len(req.output_token_ids),
            )
            parent_id, index = self.parent_of(req.request_id)
            if parent_id != req.request_id:  # a sample: its request finishes with its last sample
                out = self._parents[parent_id].add(index, out)
                if out is None:
                    continue
                del self._parents[parent_id]
            outputs.append(out)
        return outputs
