"""EngineConfig: every engine option in one frozen dataclass.

Invariants:
- Unknown keys are an error naming them (``EngineConfig.from_dict``), never silently dropped.
- The object is never mutated: values that depend on the model (``max_model_len``) are filled in by ``resolve()``,
  which returns a new, fully checked config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

PREEMPTION_MODES = ("none", "recompute", "swap")
SCHEDULING_STRATEGIES = ("continuous", "prefill_first")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_BACKENDS = ("auto", "cpu_kernel", "triton", "torch", "reference")  # kernel families: ops/__init__.py
QUANTIZATIONS = ("none", "w8a8", "int8", "int4", "fp8")  # model/quant.py, model/fp8.py
KV_CACHE_DTYPES = ("auto", "fp8")  # auto = the model's dtype; fp8 = float8 e4m3 (worker/memory.py)
LOAD_FORMATS = ("auto", "dummy")
CPU_GEMMS = ("auto", "onednn", "panels", "aten")  # model/gemm.py
ACTIVATION_DTYPES = ("auto", "float32")  # auto = the model's dtype (model/loader.py: resolve_activation_dtype)


class ConfigError(ValueError):
    """A bad engine option: the message names the option and what is allowed."""


@dataclass(frozen=True)
class EngineConfig:
    # Model
    model: str | None = None  # HF model directory or .gguf file; None = the embedded default model
    dtype: str = "auto"  # auto = float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    max_model_len: int | None = None  # None = the model's max_position_embeddings
    cache_dir: str | None = None  # where converted GGUF models are kept; None = ~/.cache/tokenmill
    quantization: str = "none"  # none | w8a8 | int8 | int4 (weight-only; CPU, model/quant.py) | fp8 (model/fp8.py)
    load_format: str = "auto"  # auto = the checkpoint; dummy = random weights of the config's shapes (benchmarks)
    # KV cache
    block_size: int = 16
    kv_cache_memory: float = 4.0  # GiB of KV cache on CPU
    kv_cache_dtype: str = "auto"  # auto = the model's dtype; fp8 = float8 e4m3, half of bf16's bytes per token
    gpu_memory_utilization: float = 0.95  # fraction of GPU memory tokenmill may use on CUDA
    num_kv_blocks: int | None = None  # exact pool size; overrides the memory budget (tests, tuning)
    # Scheduler
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget of one step
    # of a step's budget, what batch-priority rows (a server's Batch API batches) may take while online requests run
    # or ran lately (an eighth of it while one waits or prefills), so online steps stay short (core/priority.py);
    # None = max_num_batched_tokens // 8
    batch_token_budget: int | None = None
    enable_chunked_prefill: bool = True
    prefill_chunk_size: int | None = None  # most prompt tokens of one request in one step; None = the budget
    preemption_mode: str = "none"  # none | recompute | swap (a victim's K/V waits in swap_space, core/scheduler.py)
    swap_space: float = 4.0  # GiB of host memory (pinned on CUDA) for swapped-out K/V under preemption_mode="swap"
    scheduling_strategy: str = "continuous"
    sort_by_length: bool = False
    enable_prefix_caching: bool = True  # share the KV blocks of common prompt prefixes (core/kv_cache_manager.py)
    # Execution
    attention_backend: str = "auto"
    enforce_eager: bool = False  # CUDA: no CUDA graphs for decode steps (worker/cuda_graphs.py)
    tensor_parallel_size: int = 1  # ranks one model is split over (tokenmill/parallel/): gloo on CPU, NCCL on CUDA
    cpu_gemm: str = "auto"  # the float linears' CPU GEMMs: auto (panels on AVX2-only CPUs, else onednn), onednn,
    # panels, or aten (model/gemm.py)
    # what the activations (and a kv_cache_dtype "auto" cache) are in: auto = the model's dtype; float32 = float32
    # over the model's weights (CPU; a bfloat16 model's weights stay bfloat16 on the panels path, half the memory)
    activation_dtype: str = "auto"
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default (physical cores)
    seed: int = 0  # seeds the shared generator of requests that have no seed of their own
    # LoRA (model/lora.py): PEFT adapter directories loaded with the model, ((name, path), ...); a dict or
    # "NAME=PATH" strings are accepted. A request picks one by name (SamplingParams.lora); at most max_loras.
    lora_adapters: tuple[tuple[str, str], ...] = ()
    max_loras: int = 8

    def __post_init__(self) -> None:
        adapters = self.lora_adapters
        if isinstance(adapters, dict):
            adapters = tuple((str(k), str(v)) for k, v in adapters.items())
        elif isinstance(adapters, (list, tuple)):
            adapters = tuple(tuple(str(a).partition("=")[::2]) if isinstance(a, str) else tuple(a) for a in adapters)
        object.__setattr__(self, "lora_adapters", adapters)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown engine option(s): {', '.join(unknown)}; known options: {', '.join(sorted(known))}"
            )
        cfg = cls(**values)
        cfg.check()
        return cfg

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Checks what can be checked without the model; raises ConfigError naming every bad option."""
        problems = []

        def positive_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                problems.append(f"{name} must be a positive integer, got {v!r}")

        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size"):
            positive_int(name)
        for name in ("max_model_len", "num_kv_blocks", "prefill_chunk_size", "num_threads", "batch_token_budget"):
            positive_int(name, allow_none=True)
        if self.preemption_mode not in PREEMPTION_MODES:
            problems.append(f"preemption_mode must be one of {PREEMPTION_MODES}, got {self.preemption_mode!r}")
        if self.scheduling_strategy not in SCHEDULING_STRATEGIES:
            problems.append(
                f"scheduling_strategy must be one of {SCHEDULING_STRATEGIES}, got {self.scheduling_strategy!r}"
            )
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.cpu_gemm not in CPU_GEMMS:
            problems.append(f"cpu_gemm must be one of {CPU_GEMMS}, got {self.cpu_gemm!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            problems.append(f"activation_dtype must be one of {ACTIVATION_DTYPES}, got {self.activation_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        elif self.quantization != "none" and isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size > 1:
            problems.append(f"tensor_parallel_size > 1 runs float weights only, not quantization={self.quantization!r}")
        if self.load_format not in LOAD_FORMATS:
            problems.append(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.device not in DEVICES:
            problems.append(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            problems.append(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            problems.append(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if not isinstance(self.kv_cache_memory, (int, float)) or self.kv_cache_memory <= 0:
            problems.append(f"kv_cache_memory must be a positive number of GiB, got {self.kv_cache_memory!r}")
        if not isinstance(self.swap_space, (int, float)) or isinstance(self.swap_space, bool) or self.swap_space < 0:
            problems.append(f"swap_space must be a number of GiB >= 0, got {self.swap_space!r}")
        elif self.preemption_mode == "swap" and self.swap_space == 0:
            problems.append("preemption_mode='swap' needs swap_space > 0 GiB")
        positive_int("max_loras")
        names = [a[0] if len(a) == 2 else "" for a in self.lora_adapters]
        if not all(len(a) == 2 and a[0] and a[1] for a in self.lora_adapters):
            problems.append(f"lora_adapters (--lora) must be NAME=PATH pairs, a PEFT adapter directory each, got "
                            f"{['='.join(a) for a in self.lora_adapters]}")
        elif len(set(names)) < len(names):
            problems.append(f"lora_adapters names must be distinct, got {names}")
        elif isinstance(self.max_loras, int) and len(names) > self.max_loras:
            problems.append(f"{len(names)} LoRA adapters given but max_loras={self.max_loras}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    def resolve(self, model_max_len: int) -> "EngineConfig":
        """Fills in model-dependent values and checks the options against each other."""
        self.check()
        max_model_len = self.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ConfigError(
                f"max_model_len={max_model_len} is longer than the model supports ({model_max_len} positions)"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"with enable_chunked_prefill=False, max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                f">= max_model_len ({max_model_len}) so every prompt fits one step; enable chunked prefill or "
                f"lower max_model_len"
            )
        return self.replace(max_model_len=max_model_len)

    @property
    def resolved_batch_token_budget(self) -> int:
        """``batch_token_budget``, resolved (at most the step's budget)."""
        budget = self.batch_token_budget or max(1, self.max_num_batched_tokens // 8)
        return min(budget, self.max_num_batched_tokens)

    @property
    def chunk_limit(self) -> int:
        """Most tokens of one request's prefill that one step may take."""
        return min(self.prefill_chunk_size or self.max_num_batched_tokens, self.max_num_batched_tokens)
