"""``--config batch.yaml``: the sections of an offline batch config, mapped onto engine options and sampling defaults.

```yaml
model: path/to/model          # optional
scheduler: {max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, prefill_chunk_size, enable_prefix_caching,
            preemption_mode, scheduling_strategy, sort_by_length}
memory:    {gpu_memory_utilization, kv_cache_memory, kv_cache_dtype, num_kv_blocks, block_size, swap_space}
engine:    {dtype, activation_dtype, quantization, device, max_model_len, attention_backend, cpu_gemm, num_threads, seed,
            cache_dir, load_format, lora_adapters: {NAME: PATH}, max_loras}
sampling:  {max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos, lora,
            structured: {json: SCHEMA | json_object: true | regex: R | choice: [A, B] | grammar: GBNF}}
```
An unknown section or key is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tokenmill.config import ConfigError

SECTIONS = {
    "scheduler": {"max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill", "prefill_chunk_size",
                  "preemption_mode", "scheduling_strategy", "sort_by_length", "enable_prefix_caching"},
    "memory": {"gpu_memory_utilization", "kv_cache_memory", "kv_cache_dtype", "num_kv_blocks", "block_size",
               "swap_space"},
    "engine": {"dtype", "activation_dtype", "quantization", "device", "max_model_len", "attention_backend", "cpu_gemm",
               "num_threads", "seed", "cache_dir", "load_format", "lora_adapters", "max_loras"},
    "sampling": {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                 "structured", "lora"},
}


def load_batch_config(path: Path) -> tuple[str | None, dict, dict]:
    """(model, engine options, sampling defaults) from a YAML file; raises ConfigError naming a bad key."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections")
    model = data.pop("model", None)
    engine: dict = {}
    sampling: dict = {}
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown section {section!r}; known: model, {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: section {section!r} must be a mapping")
        for key, value in values.items():
            if key not in SECTIONS[section]:
                raise ConfigError(
                    f"config file {path}: unknown key {section}.{key}; known: {', '.join(sorted(SECTIONS[section]))}"
                )
            (sampling if section == "sampling" else engine)[key] = value
    return model, engine, sampling
