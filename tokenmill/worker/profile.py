"""The profiling pass: what the largest step's activations take on the device, measured before the KV pool is sized.

On CUDA the KV pool gets what ``gpu_memory_utilization`` of the device leaves after the weights and the peak of one
step. ``profile_step`` runs the largest step the scheduler can form (``max_num_batched_tokens`` prompt tokens, in
sequences of at most ``max_model_len - 1``, with a scratch KV cache just big enough) and the LM head with the
sampler's float32 copy on ``max_num_seqs`` rows; ``measure_activation_bytes`` is the allocator's peak above what was
allocated before it, less the scratch cache. The forward itself runs on any device
(the tests run it on CPU); only the measurement needs CUDA's allocator statistics.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.config import EngineConfig


def profile_inputs(config: EngineConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                                       int]:
    """(input_ids, positions, metadata, number of cache blocks) of the largest prefill step."""
    n, bs = config.max_num_batched_tokens, config.block_size
    longest = max(1, min(n, config.max_model_len - 1))
    lens = [longest] * (n // longest) + ([n % longest] if n % longest else [])
    blocks_per = [-(-m // bs) for m in lens]
    width = max(blocks_per)
    table = np.zeros((len(lens), width), dtype=np.int64)
    slots, positions, next_block = [], [], 1  # block 0 stays the padding block
    for i, (m, nb) in enumerate(zip(lens, blocks_per)):
        table[i, :nb] = np.arange(next_block, next_block + nb)
        next_block += nb
        p = np.arange(m, dtype=np.int64)
        positions.append(p)
        slots.append(table[i, p // bs] * bs + p % bs)
    qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    meta = AttentionMetadata(
        query_start_loc=qsl.tolist(), seq_lens=list(lens), num_decodes=0,
        slot_mapping=torch.from_numpy(np.concatenate(slots)).to(device),
        block_tables=torch.from_numpy(table).to(device),
        seq_lens_tensor=torch.tensor(lens, dtype=torch.int64, device=device),
        query_start_loc_tensor=torch.from_numpy(qsl).to(device),
    )
    ids = torch.zeros(n, dtype=torch.int64, device=device)
    return ids, torch.from_numpy(np.concatenate(positions)).to(device), meta, next_block


@torch.inference_mode()
def profile_step(model, config: EngineConfig, kv_dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, int]:
    """Runs the largest step once (model, LM head, the sampler's float32 widening); returns its log-probabilities
    and the bytes of the scratch KV cache it wrote into."""
    ids, positions, meta, num_blocks = profile_inputs(config, device)
    attn = model.layers[0].self_attn
    shape = (num_blocks, config.block_size, attn.num_kv_heads, attn.head_dim)
    kv = [(torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
          for _ in model.layers]
    hidden = model(ids, positions, kv, meta, model.ops.attention)  # [n, hidden]
    rows = min(config.max_num_seqs, hidden.shape[0])
    logits = model.compute_logits(hidden[-rows:], as_float32=False)
    scratch = 2 * len(kv) * kv[0][0].numel() * kv[0][0].element_size()
    return logits.float().log_softmax(dim=-1), scratch  # the sampler's widest temporaries: a float32 copy and one more


def measure_activation_bytes(model, config: EngineConfig, kv_dtype: torch.dtype, device: torch.device) -> int:
    """CUDA: peak bytes of ``profile_step`` above the memory allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out, scratch = profile_step(model, config, kv_dtype, device)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    torch.cuda.empty_cache()
    return max(0, peak - base - scratch)
