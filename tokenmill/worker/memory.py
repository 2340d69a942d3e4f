"""KV cache sizing: how many blocks the memory budget holds, and the start-up check that one request fits."""

from __future__ import annotations

import torch

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.model.model_config import ModelConfig

GIB = 2**30


def kv_cache_dtype(config: EngineConfig, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's dtype, or float8 e4m3 for ``kv_cache_dtype="fp8"``.

    fp8 stores K and V as torch casts them (round to nearest, saturating at +-448, no scale: K and V of the models
    here stay far inside that range) and attention reads them back exactly, in float32. Half of bfloat16's bytes and a
    quarter of float32's, so the same ``kv_cache_memory`` holds 2x / 4x the tokens; what it costs in quality is
    measured by ``tokenmill eval --kv-cache-dtype fp8`` (BENCHMARKS.md)."""
    return torch.float8_e4m3fn if config.kv_cache_dtype == "fp8" else model_dtype


def kv_bytes_per_block(mc: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V for ``block_size`` tokens across all layers, stored in ``dtype`` (the KV cache's)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * mc.num_hidden_layers * block_size * mc.num_key_value_heads * mc.head_dim * elem


def planned_weight_bytes(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype) -> int:
    """The weights' bytes on the device once loaded, from the config (for a plan made before they are): under fp8 one
    byte a linear weight plus a float32 scale per output row, the model's dtype otherwise (the embeddings, the LM
    head and the norms stay float)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = mc.num_parameters() * elem
    if config.quantization == "fp8":
        for name, out, inp, count in mc.linear_shapes():
            if name not in mc.FLOAT_LINEARS:
                total -= out * inp * count * (elem - 1)  # one byte a weight
                total += 4 * out * count  # a float32 scale a row
    return total // config.tensor_parallel_size


def kv_budget_bytes(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device,
                    activation_bytes: int | None = None, weights_to_load: int = 0) -> int:
    """Bytes the KV cache may take: ``kv_cache_memory`` GiB on CPU; on CUDA, what ``gpu_memory_utilization`` of the
    device leaves after what is in use (the weights, other processes), ``weights_to_load`` (a plan made before the
    model is loaded: ``planned_weight_bytes``) and the activations of one full step: as the profiling pass measured
    them (``worker/profile.py``), or else an estimate from the model's shapes."""
    if device.type != "cuda":
        return int(config.kv_cache_memory * GIB)
    free, total = torch.cuda.mem_get_info(device)
    used = total - free + weights_to_load
    if activation_bytes is not None:
        activations = activation_bytes
    else:
        elem = torch.empty((), dtype=dtype).element_size()
        activations = config.max_num_batched_tokens * (2 * mc.mlp_width() + 6 * mc.hidden_size) * elem * 2
        activations += config.max_num_seqs * mc.vocab_size * 4 * 2  # logits of the sampled rows, float32
    return int(total * config.gpu_memory_utilization - used - activations)


def plan_num_swap_blocks(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype) -> int:
    """Host blocks for swapped-out K/V: ``swap_space`` GiB of blocks shaped like the device's (0 unless
    ``preemption_mode="swap"``)."""
    if config.preemption_mode != "swap":
        return 0
    return int(config.swap_space * GIB) // kv_bytes_per_block(mc, config.block_size, kv_cache_dtype(config, dtype))


def kv_blocks(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device,
              activation_bytes: int | None = None, weights_to_load: int = 0) -> tuple[int, int, str]:
    """(bytes per KV block, the blocks the budget holds, what set the budget): ``num_kv_blocks`` if set, else
    ``kv_budget_bytes`` over the bytes per block. Never raises (``plan_num_blocks`` checks the result)."""
    per_block = kv_bytes_per_block(mc, config.block_size, kv_cache_dtype(config, dtype))
    if config.num_kv_blocks is not None:
        return per_block, config.num_kv_blocks, f"num_kv_blocks={config.num_kv_blocks}"
    budget = kv_budget_bytes(config, mc, dtype, device, activation_bytes, weights_to_load)
    source = (f"kv_cache_memory={config.kv_cache_memory} GiB" if device.type != "cuda"
              else f"gpu_memory_utilization={config.gpu_memory_utilization}")
    return per_block, max(budget, 0) // per_block, source


def plan_num_blocks(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype, device: torch.device,
                    activation_bytes: int | None = None) -> int:
    """Number of KV blocks; raises ConfigError when they cannot hold one request of ``max_model_len`` tokens.
    ``activation_bytes``: the profiling pass's measure of one step (CUDA), else estimated."""
    per_block, num_blocks, source = kv_blocks(config, mc, dtype, device, activation_bytes)
    needed = -(-config.max_model_len // config.block_size)
    if num_blocks < needed:
        raise ConfigError(
            f"the KV cache budget ({source}) holds {num_blocks} blocks of {config.block_size} tokens, but one request "
            f"of max_model_len={config.max_model_len} tokens needs {needed} blocks "
            f"({needed * per_block / GIB:.3f} GiB); raise the budget or lower max_model_len"
        )
    return num_blocks
