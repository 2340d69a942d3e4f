"""ModelInfo: what the engine knows of a model before (and without) loading its weights: the resolved config, the
model's config, tokenizer and EOS ids, the device and dtype, the LoRA adapters read and checked, and the KV memory a
plan can count on.

A job reads it once (``ModelInfo.read``) to validate its input and plan memory, then hands it to the engine
(``LLMEngine(config, info=...)``), which loads the weights without reading the tokenizer, config or adapters again.
An engine that exists keeps the one it was built from (``engine.info``): a job on the server's engine takes it
from there. Nothing here reads a weight tensor (a GGUF file's tokenizer and config come from its cached conversion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.config import EngineConfig
from tokenmill.model.loader import (eos_token_ids, load_tokenizer, read_model_config, resolve_activation_dtype,
                                    resolve_dtype, resolve_model_path, tokenizer_dir)
from tokenmill.model.lora import LoraAdapter, planned_lora_bytes, read_adapter
from tokenmill.model.model_config import ModelConfig
from tokenmill.worker.memory import kv_blocks, planned_weight_bytes


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available")
    return torch.device(device)


@dataclass
class ModelInfo:
    config: EngineConfig  # resolved against the model (max_model_len, ...)
    path: Path  # the model as given: an HF directory or a GGUF file
    hf_dir: Path  # its HF directory (a GGUF file's cached conversion)
    model_config: ModelConfig
    tokenizer: object
    eos_token_ids: frozenset[int]
    device: torch.device
    dtype: torch.dtype  # the model's: its weights'
    adapters: list[LoraAdapter] = field(default_factory=list)  # config.lora_adapters, read and checked
    # the activations' and the KV cache's (kv_cache_dtype "auto"), where it differs from dtype (activation_dtype
    # "float32" over a bfloat16 model: loader.resolve_activation_dtype); None = dtype
    activation_dtype: torch.dtype | None = None

    @classmethod
    def read(cls, config: EngineConfig) -> ModelInfo:
        """Raises ValueError (a missing model, a bad adapter, ...) with one line to show."""
        path = resolve_model_path(config.model)
        cache_dir = Path(config.cache_dir) if config.cache_dir else None
        hf_dir, mc = read_model_config(path, cache_dir)
        config = config.resolve(mc.max_position_embeddings)
        adapters = [read_adapter(name, p, mc) for name, p in config.lora_adapters]
        tokenizer = load_tokenizer(tokenizer_dir(hf_dir, config.load_format, cache_dir))
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        activation = resolve_activation_dtype(config.activation_dtype, dtype, device)
        return cls(config, path, hf_dir, mc, tokenizer, eos_token_ids(hf_dir, mc, tokenizer), device, dtype, adapters,
                   activation if activation != dtype else None)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype (and the KV cache's, unless kv_cache_dtype says otherwise)."""
        return self.activation_dtype or self.dtype

    @property
    def model_name(self) -> str:
        p = self.path
        return p.stem if p.suffix == ".gguf" else p.name

    @property
    def lora_names(self) -> frozenset[str]:
        return frozenset(a.name for a in self.adapters)

    def planned_weight_bytes(self) -> int:
        """The weights' bytes once loaded (``worker/memory.planned_weight_bytes``), the LoRA adapters' stacked
        factors included (``planned_lora_bytes``)."""
        return planned_weight_bytes(self.config, self.model_config, self.dtype) + self.planned_lora_bytes()

    def planned_lora_bytes(self) -> int:
        """The adapters' factors once attached (on a CPU with B^T beside them for the C++ row loop)."""
        return planned_lora_bytes(self.adapters, self.model_config, self.compute_dtype, self.config.tensor_parallel_size,
                                  transposed=self.device.type == "cpu")

    def kv_blocks(self, weights_loaded: bool) -> tuple[int, int]:
        """(bytes per KV block, the blocks the memory budget holds) as the engine will size its pool:
        ``num_kv_blocks`` if set, else ``kv_cache_memory`` on CPU / what ``gpu_memory_utilization`` leaves on
        CUDA (before the engine exists, less the weights it will load: ``weights_loaded`` False)."""
        weights = 0 if weights_loaded else self.planned_weight_bytes()
        per_block, num_blocks, _ = kv_blocks(self.config, self.model_config, self.compute_dtype, self.device,
                                             weights_to_load=weights)
        return per_block, num_blocks
