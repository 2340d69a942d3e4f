"""CpuOps: the C++ CPU kernels (``kernels/cpu_kernel.py``) where they apply, TorchOps' ops elsewhere.

Which ops take the C++ path is fixed by dtype and layout (each method says when); where they do, the results are
those of the torch ops (bit-equal, or differing in a last bit where stated; ``tests/model/test_cpu_kernel.py``)."""

from __future__ import annotations

import itertools

import torch

from tokenmill.attention.backend import AttentionMetadata, needs_window
from tokenmill.ops.torch_ops import TorchOps


TILE_MIN_QUERY = 16  # new tokens a request needs in a step for its prefill tokens to be attended in tiles
_CASTS_TO_FP8 = (torch.float32, torch.bfloat16)  # rows write_kv casts into an fp8 cache itself



class CpuKernelAttention:
    """Every token of the step (decodes and prefill chunks) in one call of the C++ kernels over the paged cache; K/V
    written by the C++ ``write_kv``. The prefill tokens of requests with at least ``min_q`` (TILE_MIN_QUERY; 0: none)
    new tokens are attended in tiles of 16 query tokens: on AMX (``cpu_amx.cpp``) with ``amx`` for bfloat16 queries
    over a bfloat16 or fp8 cache and float32 queries over an fp8 cache (three bfloat16 parts each: exact products),
    on the vector units otherwise (``cpu_prefill.cpp``); decodes and short chunks take
    the per-token kernel. A layer with a sliding window that bites or capped scores (Gemma 2 / 3, Mistral) takes the
    same split: on AMX the tiles take the window and the cap; otherwise ``paged_attention_windowed``, in float32 /
    float16 with the vector-unit tiles (2.7x the per-token kernel at Gemma's head_dim 256, 1.2x at 128), in bfloat16
    every token per token (its bfloat16 dot products beat the float tiles there)."""

    def __init__(self, kernels, amx: bool = False, tiled: bool = True) -> None:
        self.kernels = kernels  # the compiled module from cpu_kernel.load()
        self.amx = amx
        self.min_q = TILE_MIN_QUERY if tiled else 0

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        if k_cache.dtype != k.dtype and not (k_cache.dtype == torch.float8_e4m3fn and k.dtype in _CASTS_TO_FP8):
            k, v = k.to(k_cache.dtype), v.to(k_cache.dtype)
        self.kernels.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)  # casts float32 / bfloat16 rows to fp8
        w = window if needs_window(meta, window) else 0
        cap = softcap or 0.0
        args = (q.contiguous(), k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(),
                scale)
        if self.amx:  # prefill tiles on AMX (bfloat16; float32 over fp8), windows and caps included; the rest per token
            return self.kernels.paged_attention_amx(*args, self.min_q, w, cap)
        if w or cap:  # Gemma 2 / 3, Mistral: float32 / float16 in the vector tiles, bfloat16 per token
            return self.kernels.paged_attention_windowed(*args, w, cap, self.min_q if q.dtype != torch.bfloat16 else 0)
        return self.kernels.paged_attention_tiled(*args, self.min_q)


class CpuOps(TorchOps):
    """``amx``: use the AMX tiles where they apply (bfloat16 prefill attention, int8 weight-only GEMMs); None = where
    this machine has them (``kernels.amx_available()``: the build targets a CPU with AMX and the OS grants the tile
    state)."""

    name = "cpu_kernel"

    def __init__(self, kernels, device: torch.device | str = "cpu", amx: bool | None = None) -> None:
        super().__init__(torch.device(device))
        self.kernels = kernels
        self.amx = kernels.amx_available() if amx is None else amx and kernels.amx_available()
        self.attention = CpuKernelAttention(kernels, self.amx)

    def rms_norm(self, x, weight, eps):
        """One pass per row in float32 / bfloat16 / float16 (bit-equal to the torch ops in bfloat16 / float16; in
        float32 the sum of squares is added in another order, within a few ulps of the torch ops: float32's
        prompts spent ~7% of a long prefill step in the ops' five passes over each [tokens, hidden] tensor)."""
        if (x.dtype in (torch.float32, torch.bfloat16, torch.float16) and x.is_contiguous()
                and weight.dtype == x.dtype):
            return self.kernels.rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def rope(self, q, k, cos, sin):
        """One pass over q and k in float32 / bfloat16 (bit-equal to the torch ops)."""
        if q.dtype in (torch.float32, torch.bfloat16) and q.stride(-1) == 1:
            return self.kernels.rope(q, k, cos, sin)
        return super().rope(q, k, cos, sin)

    def silu_mul(self, gate_up):
        """One pass in float32 / bfloat16 (torch's roundings; a value may differ in its last bit)."""
        if gate_up.dtype in (torch.float32, torch.bfloat16) and gate_up.dim() == 2:
            return self.kernels.silu_mul(gate_up.contiguous())
        return super().silu_mul(gate_up)

    def argmax(self, x):
        """One vectorised pass per row (float32 / bfloat16), several times faster than torch's over a vocabulary."""
        if x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous() and x.shape[1] > 0:
            return self.kernels.argmax_rows(x)
        return super().argmax(x)

    def sample_plain(self, logits, temperature, u):
        """One C++ pass per row over float32 / bfloat16 logits (``sample_rows``; torch's softmax and float64
        cumulative sum took ~30 ms a step for 128 x 49k rows). The same draw up to the summation order: a uniform
        within rounding of a boundary between two tokens may pick the other one."""
        if logits.dtype in (torch.float32, torch.bfloat16) and logits.is_contiguous() and logits.shape[1] > 0:
            return self.kernels.sample_rows(logits, temperature.contiguous(), u.contiguous())
        return super().sample_plain(logits, temperature, u)

    def sample_filtered(self, logits, temperature, top_k, top_p, u):
        """One C++ pass per row (``sample_rows_filtered``): the top-k / top-p candidates gathered without a full sort,
        then sorted and walked. torch's path (the best 256, a full sort for the rows they do not cover) took 32 ms a
        step for 128 x 49k rows with top-k 50 and 260 ms with top-p 0.9 on broad rows."""
        if logits.dtype in (torch.float32, torch.bfloat16) and logits.is_contiguous() and logits.shape[1] > 0:
            return self.kernels.sample_rows_filtered(logits, temperature.contiguous(), top_k.contiguous(),
                                                     top_p.contiguous(), u.contiguous())
        return None

    def token_logprobs(self, logits, targets, with_rank: bool = True):
        """One pass per row over float32 / bfloat16 logits (torch's log_softmax and comparison took ~4x the bfloat16
        LM head GEMM's time for the same rows); the rank comes with it."""
        if logits.dtype in (torch.float32, torch.bfloat16) and logits.is_contiguous() and logits.shape[1] > 0:
            lp, rank, lse = self.kernels.logprob_rows(logits, targets.contiguous())
            return lp, rank, lse
        return super().token_logprobs(logits, targets, with_rank)

    def packed_attention(self, q, k, v, seq_lens, scale, causal):
        """The whole packed batch in one call (rows of q, k, v contiguous)."""
        if all(t.stride(-1) == 1 and t.stride(-2) == t.shape[-1] for t in (q, k, v)):
            cu_seqlens = torch.tensor([0, *itertools.accumulate(seq_lens)], dtype=torch.int64)  # [num_seqs + 1]
            return self.kernels.varlen_attention(q, k, v, cu_seqlens, scale, causal)
        return super().packed_attention(q, k, v, seq_lens, scale, causal)
