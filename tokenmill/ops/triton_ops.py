"""TritonOps: the Triton kernels (``kernels/triton/``) for the GPU path; on CPU tensors they run under Triton's
interpreter (``TRITON_INTERPRET=1``, set before this module is imported), which is how the tests prove them.

Attention (K/V store included), RMSNorm, RoPE and SiLU * mul are Triton kernels; the sampler's argmax and the
embedding path's packed attention stay on torch's ops (one fused op each already; the embedding path on CUDA is
SDPA's flash kernel)."""

from __future__ import annotations

import torch

from tokenmill.attention.backend import AttentionMetadata
from tokenmill.kernels.triton.activation import silu_mul
from tokenmill.kernels.triton.kv_store import store_kv
from tokenmill.kernels.triton.norm import rms_norm
from tokenmill.kernels.triton.paged_attention import choose_num_splits, paged_attention
from tokenmill.kernels.triton.rope import rope
from tokenmill.ops.torch_ops import TorchOps


class TritonAttention:
    """The step's K/V stored and every token attended in one launch each (``kernels/triton/paged_attention.py``).
    Decode-only steps over long contexts split the keys (flash-decoding): ``num_programs_target`` and
    ``min_keys_per_split`` say when (``choose_num_splits``). Sliding windows and capped scores are the kernel's
    own, passed whether or not they bite in this step (a CUDA graph captured on short sequences replays on long
    ones)."""

    def __init__(self, num_programs_target: int = 256, min_keys_per_split: int = 256) -> None:
        self.num_programs_target = num_programs_target
        self.min_keys_per_split = min_keys_per_split

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        qsl = meta.query_start_loc
        if meta.num_decodes == meta.num_reqs:
            max_query_len = 1
            num_splits = choose_num_splits(meta.num_reqs, k_cache.shape[2], max(meta.seq_lens, default=0),
                                           self.num_programs_target, self.min_keys_per_split)
        else:
            max_query_len = max(b - a for a, b in zip(qsl, qsl[1:]))
            num_splits = 1
        return paged_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(),
                               scale, max_query_len, num_splits, window=window, softcap=softcap)


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self, device: torch.device | str) -> None:
        super().__init__(torch.device(device))
        self.attention = TritonAttention()

    def rms_norm(self, x, weight, eps):
        if x.stride(-1) == 1:
            return rms_norm(x, weight, eps)
        return super().rms_norm(x, weight, eps)

    def rope(self, q, k, cos, sin):
        if q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1:
            return rope(q, k, cos, sin)
        return super().rope(q, k, cos, sin)

    def silu_mul(self, gate_up):
        if gate_up.dim() == 2 and gate_up.stride(-1) == 1:
            return silu_mul(gate_up)
        return super().silu_mul(gate_up)

    def self_check(self) -> None:
        """Compiles and runs every kernel once on a small step (two decodes over scattered blocks and a prefill chunk
        after cached context, GQA 2) and compares it with TorchOps; raises RuntimeError naming the first that
        differs, or the kernel's own error (a Triton or driver too old for these kernels). ``make_ops("auto")``
        runs it before choosing this family on its own."""
        dtype = torch.float32 if self.device.type == "cpu" else torch.float16
        g = torch.Generator().manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(dtype).to(self.device)

        ref = TorchOps(self.device, attention="reference")
        checks = []
        x, w = rand(3, 64), rand(64)
        checks.append(("rms_norm", self.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)))
        gate_up = rand(3, 128)
        checks.append(("silu_mul", self.silu_mul(gate_up), ref.silu_mul(gate_up)))
        q, k, angle = rand(3, 4, 64), rand(3, 2, 64), rand(3, 32).float().repeat(1, 2)  # halves equal, as RoPE's
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        expected = ref.rope(q.clone(), k.clone(), cos, sin)
        got = self.rope(q.clone(), k.clone(), cos, sin)
        checks += [("rope q", got[0], expected[0]), ("rope k", got[1], expected[1])]
        block_size, q_lens, seq_lens = 16, [1, 1, 4], [20, 33, 40]
        tables = torch.tensor([[5, 2, 0], [7, 1, 3], [4, 6, 8]], dtype=torch.int64, device=self.device)
        qsl = [0, 1, 2, 6]
        slots = [int(tables[i, p // block_size]) * block_size + p % block_size
                 for i, (n, s) in enumerate(zip(q_lens, seq_lens)) for p in range(s - n, s)]
        meta = AttentionMetadata(qsl, seq_lens, 2, torch.tensor(slots, device=self.device), tables,
                                 torch.tensor(seq_lens, device=self.device))
        q, k, v = rand(6, 4, 64), rand(6, 2, 64), rand(6, 2, 64)
        caches = [rand(9, block_size, 2, 64) for _ in range(2)]
        copies = [c.clone() for c in caches]
        got = self.attention.forward(q, k, v, caches[0], caches[1], meta, 0.125)
        expected = ref.attention.forward(q, k, v, copies[0], copies[1], meta, 0.125)
        checks += [("paged_attention", got, expected), ("store_kv", caches[0], copies[0])]
        for name, a, b in checks:
            if not torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2):
                raise RuntimeError(f"the Triton kernel {name} disagrees with the torch ops on this device "
                                   f"(max difference {(a.float() - b.float()).abs().max().item():.3g})")
