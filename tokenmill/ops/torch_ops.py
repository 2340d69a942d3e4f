"""TorchOps: every kernel of the engine in plain torch ops. Any device, no compiled code: the oracle for the other
families (``cpu_ops.py``, ``triton_ops.py``), which subclass it and replace what they run faster."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.attention.backend import AttentionBackend, ReferenceAttention, TorchPagedAttention
from tokenmill.attention.packed import sdpa_packed_attention


class TorchOps:
    """The kernels an engine and its model are built with (``tokenmill/ops/__init__.py`` says how one is chosen).

    Invariant: nothing here calls compiled code of tokenmill's own, so a model built with ``TorchOps`` (attention
    ``"reference"``) is an independent check of every kernel family, K/V writes included.
    """

    name = "torch"
    kernels = None  # the C++ module (CpuOps): quantized linears run their torch paths without it

    def __init__(self, device: torch.device, attention: str = "torch") -> None:
        self.device = torch.device(device)
        self.attention: AttentionBackend = ReferenceAttention() if attention == "reference" else TorchPagedAttention()
        if attention == "reference":
            self.name = "reference"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.device})"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., dim]
        """Normalised in float32 whatever the weights' dtype, in transformers' order of operations."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotary embedding in HF's rotate-half layout. q [num_tokens, heads, head_dim], k [num_tokens, kv_heads,
        head_dim], cos / sin [num_tokens, head_dim] in q's dtype (the two halves equal). Returns (q, k); may write
        into q and k's storage (their views of the fused qkv output are not read again)."""
        cos, sin = cos[:, None], sin[:, None]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2I] = [gate | up] -> [..., I] silu(gate) * up."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def gelu_tanh_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[..., 2I] = [gate | up] -> [..., I] gelu(gate, tanh approximation) * up (Gemma's GeGLU)."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] -> [rows] int64: the first maximum (the first NaN), as torch.argmax."""
        return x.argmax(dim=-1)

    def sample_plain(self, logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """[rows, vocab] logits, [rows] float32 temperatures, [rows] float64 uniforms in [0, 1) -> [rows] int64: per
        row the first token whose cumulative mass under softmax(logits / temperature) exceeds u (the sampler's draw
        for rows without top-k / top-p; never a token of zero probability)."""
        from tokenmill.model.sampler import torch_sample_plain

        return torch_sample_plain(logits, temperature, u)

    def sample_filtered(self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                        top_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
        """Rows with top-k ([rows] int64, 0: none) and / or top-p ([rows] float32, 1: none): [rows] int64 tokens, or
        None: the sampler's own torch path (``model/sampler.py``'s ``_draw_filtered``) draws them."""
        return None

    def token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor, with_rank: bool = True):
        """logits [rows, vocab] (any float dtype), targets [rows] int64 -> (logprob [rows] float32: the target's
        log-softmax, rank [rows] int64: 1 + the number of logits above the target's, logsumexp [rows] float32).
        ``with_rank`` False: the rank may be None (here it is a pass of its own over the logits)."""
        x = logits.float()
        lse = torch.logsumexp(x, dim=-1)
        chosen = x.gather(1, targets[:, None]).squeeze(1)
        rank = (x > chosen[:, None]).sum(dim=1) + 1 if with_rank else None
        return chosen - lse, rank, lse

    def packed_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int], scale: float,
                         causal: bool) -> torch.Tensor:
        """Attention of packed sequences, each to itself (``attention/packed.py``). q [num_tokens, heads, head_dim],
        k / v [num_tokens, kv_heads, head_dim] -> [num_tokens, heads, head_dim]."""
        return sdpa_packed_attention(q, k, v, seq_lens, scale, causal)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
