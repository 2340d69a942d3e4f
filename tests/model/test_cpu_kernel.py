"""The C++ paged decode attention kernel equals the torch gather path (and so the reference backend)."""

import pytest
import torch

from tokenmill.attention import cpu_kernel
from tokenmill.attention.backend import AttentionMetadata, TorchPagedAttention


def test_kernel_builds_here():
    assert cpu_kernel.load() is not None, f"the CPU kernel did not build: {cpu_kernel.build_error()}"


# head_dim 32/64/128 take the unrolled vector paths, 16 and 80 the generic one
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (4, 4, 32, 4), (8, 1, 16, 8), (4, 2, 128, 16), (6, 2, 80, 16)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_torch_decode(heads, kv_heads, head_dim, block_size, dtype):
    mod = cpu_kernel.load()
    torch.manual_seed(heads * 100 + head_dim)
    num_blocks, batch = 300, 12
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    seq_lens = torch.tensor([1, 2, block_size, block_size + 1, 37, 100, 5, 64, 3, 90, 17, 150])
    max_blocks = -(-int(seq_lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(batch)])
    q = torch.randn(batch, heads, head_dim).to(dtype)
    meta = AttentionMetadata(list(range(batch + 1)), seq_lens.tolist(), batch, torch.empty(0), tables, seq_lens)
    scale = head_dim**-0.5
    ref = TorchPagedAttention._decode(q, k_cache, v_cache, meta, scale).float()
    out = mod.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
