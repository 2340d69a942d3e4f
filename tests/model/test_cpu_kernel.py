"""The C++ paged attention kernel equals the torch decode path and the reference backend (decodes, prefill chunks
with cached context, and whole prompts mixed in one batch); every kernel test runs on this CPU's build and on the
portable one (the ``kernels`` fixture, tests/model/conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill.kernels import cpu_kernel
from tokenmill.attention.backend import AttentionMetadata, ReferenceAttention, TorchPagedAttention
from tokenmill.ops.cpu_ops import CpuKernelAttention


def test_kernel_builds_here():
    assert cpu_kernel.load() is not None, f"the CPU kernel did not build: {cpu_kernel.build_error()}"


def _caches(num_blocks, block_size, kv_heads, head_dim, dtype):
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    return k_cache, v_cache


# head_dim 32/64/128/256 take the unrolled vector paths (on AVX-512 or AVX2 attend_simd: 10/2 heads over blocks of 32 runs a
# group of 5 heads as a register block of 4 plus a partial one, and each block as two 16-row chunks), 16 and 80 the
# generic one
SHAPES = [(9, 3, 64, 16), (10, 2, 64, 32), (4, 4, 32, 4), (8, 1, 16, 8), (4, 2, 128, 16), (6, 2, 80, 16),
          (8, 4, 256, 16)]  # the last: Gemma's head_dim (one head per register block)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_torch_decode(heads, kv_heads, head_dim, block_size, dtype, kernels):
    mod = kernels
    torch.manual_seed(heads * 100 + head_dim)
    num_blocks, batch = 300, 12
    k_cache, v_cache = _caches(num_blocks, block_size, kv_heads, head_dim, dtype)
    seq_lens = torch.tensor([1, 2, block_size, block_size + 1, 37, 100, 5, 64, 3, 90, 17, 150])
    max_blocks = -(-int(seq_lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:max_blocks] for _ in range(batch)])
    q = torch.randn(batch, heads, head_dim).to(dtype)
    meta = AttentionMetadata(list(range(batch + 1)), seq_lens.tolist(), batch, torch.empty(0), tables, seq_lens)
    scale = head_dim**-0.5
    ref = TorchPagedAttention._decode(q, k_cache, v_cache, meta, scale).float()
    qsl = torch.arange(batch + 1)
    out = mod.paged_attention(q, k_cache, v_cache, tables, seq_lens, qsl, scale).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES[:4] + SHAPES[-1:])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, FP8),
                                               (torch.bfloat16, FP8)])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 5.0), (20, 0.5)])
def test_kernel_matches_reference_on_mixed_batch(heads, kv_heads, head_dim, block_size, dtype, cache_dtype, window,
                                                 softcap, kernels):
    """Decodes first, then prefill chunks after cached context, then whole prompts, as the model runner lays them out;
    the backend writes the new K/V and attends, and must equal the reference backend on the same inputs. With a
    float8 cache both read the same stored values back exactly, so the tolerance is the queries' dtype's. The
    reference writes K/V in plain torch ops, the kernel backend with the C++ row copy: the caches must come out equal
    byte for byte. Gemma's layers too: a sliding window shorter than most sequences (its first key inside a block,
    in a later block than the first) and capped scores (a cap of 0.5 puts most scores on tanh's flat part, 5.0 on
    its slope, both sides of the kernel's switch from the series to the exponential form)."""
    cache_dtype = cache_dtype or dtype
    torch.manual_seed(7 + head_dim)
    # (context already cached, new tokens this step)
    reqs = [(5, 1), (40, 1), (block_size - 1, 1), (0, 1), (17, 9), (block_size, block_size), (3, 50), (0, 33), (0, 1)]
    num_blocks = 200
    k_cache, v_cache = _caches(num_blocks, block_size, kv_heads, head_dim, cache_dtype)
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 is the padding block
    qsl, seq_lens, tables, slots, used = [0], [], [], [], 0
    max_blocks = max(-(-(c + n) // block_size) for c, n in reqs)
    for context, new in reqs:
        nblocks = -(-(context + new) // block_size)
        table = perm[used : used + nblocks]
        used += nblocks
        tables.append(torch.cat([table, torch.zeros(max_blocks - nblocks, dtype=torch.int64)]))
        pos = torch.arange(context, context + new)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + new)
        seq_lens.append(context + new)
    num_tokens = qsl[-1]
    q = torch.randn(num_tokens, heads, head_dim).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim).to(dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim).to(dtype)
    meta = AttentionMetadata(qsl, seq_lens, sum(1 for _, n in reqs[:4] if n == 1), torch.cat(slots),
                             torch.stack(tables), torch.tensor(seq_lens))
    scale = head_dim**-0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = ReferenceAttention().forward(q, k, v, ref_k, ref_v, meta, scale, window, softcap).float()
    out = CpuKernelAttention(kernels).forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))


def _paged_step(reqs, heads, kv_heads, head_dim, block_size, dtype, cache_dtype, seed):
    """A step over scattered cache blocks holding random rows: requests given as (context cached, new tokens), the
    new tokens' K/V already in the cache. Returns the kernels' positional arguments (q, caches, tables, seq_lens,
    query_start_loc, scale)."""
    torch.manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in reqs) + 4
    k_cache, v_cache = _caches(num_blocks, block_size, kv_heads, head_dim, cache_dtype)
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 pads the tables
    max_blocks = max(-(-(c + n) // block_size) for c, n in reqs)
    tables, used, qsl = [], 0, [0]
    for context, new in reqs:
        nblocks = -(-(context + new) // block_size)
        tables.append(torch.cat([perm[used:used + nblocks], torch.zeros(max_blocks - nblocks, dtype=torch.int64)]))
        used += nblocks
        qsl.append(qsl[-1] + new)
    q = torch.randn(qsl[-1], heads, head_dim).to(dtype)
    seq_lens = torch.tensor([c + n for c, n in reqs])
    return q, k_cache, v_cache, torch.stack(tables), seq_lens, torch.tensor(qsl), head_dim**-0.5


# decodes and short chunks (per-token kernel) beside long chunks (tiles) after cached context, lengths off the tile,
# register block and block sizes, a chunk of exactly one tile, and a prompt of many tiles (a thread's K^T/V extended
# tile after tile, and handed to the other thread midway)
TILED_REQS = [(5, 1), (0, 40), (17, 33), (3, 15), (0, 16), (100, 1), (31, 70), (64, 17), (0, 301)]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", SHAPES)
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                               (torch.float32, FP8), (torch.bfloat16, FP8)])
def test_tiled_prefill_matches_the_per_token_kernel(heads, kv_heads, head_dim, block_size, dtype, cache_dtype,
                                                    kernels):
    """paged_attention_tiled: the long requests' tokens equal the per-token kernel's within float32 summation order
    (both compute in float32 on the same stored values), the others are the per-token kernel's bit for bit, and
    min_q 0 is paged_attention itself."""
    args = _paged_step(TILED_REQS, heads, kv_heads, head_dim, block_size, dtype, cache_dtype or dtype,
                       seed=heads + head_dim + block_size)
    per_token = kernels.paged_attention(*args)
    tiled = kernels.paged_attention_tiled(*args, 16)
    tol = {torch.float32: 2e-6 * max(1, head_dim // 128), torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(tiled.float(), per_token.float(), atol=tol, rtol=tol)  # rounding grows with head_dim
    qsl = args[5].tolist()
    short = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i, (_, n) in enumerate(TILED_REQS) if n < 16])
    assert torch.equal(tiled[short], per_token[short])
    assert torch.equal(kernels.paged_attention_tiled(*args, 0), per_token)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [SHAPES[0], SHAPES[2], SHAPES[-1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,softcap", [(1, 0.0), (23, 0.0), (100, 0.0), (0, 3.0), (40, 0.7)])
def test_windowed_tiles_match_the_windowed_per_token_kernel(heads, kv_heads, head_dim, block_size, dtype, window,
                                                           softcap, kernels):
    """paged_attention_windowed with tiles (min_q 16) against itself per token (min_q 0, the form the mixed-batch test
    holds to the reference): windows of one key, shorter than a tile, and longer than some prompts; rows whose windows
    start in different 16-key steps of one register block; caps alone and with a window."""
    args = _paged_step(TILED_REQS, heads, kv_heads, head_dim, block_size, dtype, dtype, seed=window + head_dim)
    per_token = kernels.paged_attention_windowed(*args, window, softcap, 0)
    tiled = kernels.paged_attention_windowed(*args, window, softcap, 16)
    tol = {torch.float32: 4e-6 * max(1, head_dim // 128), torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(tiled.float(), per_token.float(), atol=tol, rtol=tol)
    qsl = args[5].tolist()
    short = torch.cat([torch.arange(qsl[i], qsl[i + 1]) for i, (_, n) in enumerate(TILED_REQS) if n < 16])
    assert torch.equal(tiled[short], per_token[short])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_tiled_prefill_matches_the_reference_whatever_the_threads(threads, kernels):
    """float32, GQA: the tiles equal the reference attention (float64 on the same inputs) to float32 accuracy
    however the tiles are split between threads (each split restarts or extends a thread's K^T/V)."""
    reqs = [(0, 300), (200, 130), (7, 1), (0, 20), (45, 64)]
    q, k_cache, v_cache, tables, seq_lens, qsl, scale = _paged_step(reqs, 8, 2, 64, 16, torch.float32, torch.float32,
                                                                    seed=5)
    meta = AttentionMetadata(qsl.tolist(), seq_lens.tolist(), 0, torch.empty(0, dtype=torch.int64), tables, seq_lens)
    ref = torch.empty_like(q, dtype=torch.float64)
    for i in range(len(reqs)):  # the reference's attention over what the cache holds (its K/V write left out)
        ReferenceAttention._prefill_one(i, q.double(), k_cache.double(), v_cache.double(), meta, scale, ref)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.paged_attention_tiled(q, k_cache, v_cache, tables, seq_lens, qsl, scale, 16)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_reads_every_float8_code_exactly(dtype, kernels):
    """A sequence of one token attends only to itself, so the output is its V row: a row holding all 254 finite e4m3
    codes must come back equal to torch's conversion of them (exact in float32; rounded once in bfloat16)."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[codes & 0x7F == 0x7F] = 0  # the two NaN codes; the cache never holds them (torch saturates)
    v_cache = torch.zeros(2, 4, 1, 256, dtype=torch.uint8)
    v_cache[1, 0, 0] = codes
    v_cache = v_cache.view(FP8)
    k_cache = torch.zeros_like(v_cache)
    q = torch.randn(1, 2, 256).to(dtype)
    out = kernels.paged_attention(q, k_cache, v_cache, torch.tensor([[1]]), torch.tensor([1]),
                                           torch.tensor([0, 1]), 0.0625)
    expected = codes.view(FP8).float().to(dtype)
    assert torch.equal(out[0, 0], expected) and torch.equal(out[0, 1], expected)


def test_kernel_rejects_a_cache_of_another_dtype(kernels):
    mod = kernels
    k_cache, v_cache = _caches(4, 4, 1, 16, torch.bfloat16)
    with pytest.raises(RuntimeError, match="q's dtype or float8"):
        mod.paged_attention(torch.randn(1, 2, 16), k_cache, v_cache, torch.tensor([[1]]), torch.tensor([1]),
                            torch.tensor([0, 1]), 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, FP8])
def test_write_kv_kernel_equals_index_copy(dtype, kernels):
    """The C++ row copy puts every new K and V row where index_copy_ puts it, from strided rows (V is a view of the
    fused qkv output), and refuses a slot outside the cache."""
    torch.manual_seed(3)
    qkv = torch.randn(7, 3 * 2 * 16).to(dtype if dtype != FP8 else torch.float32)
    k = qkv[:, :32].reshape(7, 2, 16).contiguous()
    v = qkv[:, 32:64].view(7, 2, 16)  # rows 96 elements apart
    if dtype == FP8:
        k, v = k.to(FP8), v.to(FP8)
    slots = torch.tensor([5, 0, 17, 3, 31, 8, 16])
    caches = [torch.zeros(4, 8, 2, 16, dtype=torch.uint8).view(dtype) if dtype == FP8 else torch.zeros(4, 8, 2, 16,
              dtype=dtype) for _ in range(4)]
    kernels.write_kv(k, v, caches[0], caches[1], slots)
    for new, cache in ((k, caches[2]), (v, caches[3])):
        cache.view(torch.uint8).view(-1, 2, 16 * cache.element_size()).index_copy_(
            0, slots, new.contiguous().view(torch.uint8).view(7, 2, -1))
    assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernels.write_kv(k, v, caches[0], caches[1], torch.tensor([0, 1, 2, 3, 4, 5, 32]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_casts_rows_into_an_fp8_cache_as_torch_does(dtype, kernels):
    """float32 / bfloat16 K and V rows into an fp8 cache: write_kv's cast equals torch's ``.to(float8_e4m3fn)`` bit
    for bit: normal and subnormal codes, ties to even in both ranges, saturation at +-448 (inf too), NaN, -0, values
    far below 2^-9; rows of 48 (three 16-lane groups) and of 20 (the scalar tail)."""
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([0.0, -0.0, 448.0, 464.0, 479.9, 480.0, 1e6, float("inf"), -float("inf"), float("nan"),
                            2.0**-6, 2.0**-7, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 2.5 * 2.0**-9, 2.0**-11, 2.0**-30,
                            1.0625, 1.1875, -1.0625, 432.0, 440.0, 15.5 * 2.0**-10, 2.0**-6 - 2.0**-20, -3e-3])
    for row in (48, 20):
        n = 40 * row
        x = torch.cat([special, torch.randn(n, generator=g) * 3,  # and magnitudes from 2^-30 to 2^12 and beyond
                       torch.randn(n, generator=g).mul_(12).exp2_().mul_(torch.randn(n, generator=g))])[: 2 * n]
        x = x.to(dtype)  # bfloat16: the values it holds
        k, v = x[:n].view(40, 1, row), x[n:].view(40, 1, row)
        slots = torch.randperm(48, generator=g)[:40]
        mine = [torch.zeros(12, 4, 1, row, dtype=FP8) for _ in range(2)]
        ref = [torch.zeros(12, 4, 1, row, dtype=FP8) for _ in range(2)]
        kernels.write_kv(k, v, mine[0], mine[1], slots)
        kernels.write_kv(k.to(FP8), v.to(FP8), ref[0], ref[1], slots)
        for a, b in zip(mine, ref):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_is_bit_equal_to_the_torch_ops(dtype, kernels):
    """q and k as views of a fused qkv output (strided rows), llama3-scaled frequencies, far positions: the kernel
    rounds as torch's mul, mul, add do (no fused multiply-add), so the results are identical."""
    from tokenmill.model.layers import Build, RotaryEmbedding
    from tokenmill.model.model_config import RopeConfig
    from tokenmill.ops import TorchOps
    from tokenmill.ops.torch_ops import rotate_half

    torch.manual_seed(5)
    t, heads, kv_heads, d = 37, 6, 2, 64
    q, k, _ = (torch.randn(t, (heads + 2 * kv_heads) * d) * 3).to(dtype).split(
        [heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k = q.view(t, heads, d), k.view(t, kv_heads, d)
    rotary = RotaryEmbedding(d, 8192, RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0),
                             Build(TorchOps("cpu"), dtype))
    cos, sin = rotary._cos_sin(torch.randint(0, 8192, (t,), generator=torch.Generator().manual_seed(1)), dtype)
    out_q, out_k = kernels.rope(q, k, cos, sin)
    cos, sin = cos[:, None], sin[:, None]
    assert torch.equal(out_q, q * cos + rotate_half(q) * sin)
    assert torch.equal(out_k, k * cos + rotate_half(k) * sin)


def test_argmax_rows_equals_torch_argmax(kernels):
    """Greedy sampling's argmax: the first of tied maxima, the first NaN, an all -inf row, a maximum in the tail
    past the last 16 lanes, and rows shorter than 16; float32 logits, and bfloat16 ones as the LM head leaves them
    (rounding makes more ties)."""
    torch.manual_seed(4)
    x = torch.randn(9, 1000)
    x[1, 100] = x[1, 700] = 50.0
    x[2, 7] = x[2, 9] = float("nan")
    x[3] = -float("inf")
    x[4, 999] = 50.0
    x[5, 3] = float("inf")
    for t in (x, torch.randn(4, 13), x[:1].clone()):
        for dtype in (torch.float32, torch.bfloat16):
            t = t.to(dtype)
            assert torch.equal(kernels.argmax_rows(t), t.argmax(dim=-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_rows_equals_torch_log_softmax(kernels, dtype):
    """Prompt logprobs' reduction: each target's log-softmax, its rank (1 + the logits above it: ties with the
    target do not count, as bfloat16 rounding makes many) and the row's logsumexp, against torch on the same logits,
    for a vocabulary that is not a multiple of 16, a target that is the maximum, one that is the minimum, -inf
    logits (masked tokens) and a row far from zero; bad targets are refused."""
    from tokenmill.ops.torch_ops import TorchOps

    torch.manual_seed(5)
    x = (torch.randn(7, 1003) * 3).to(dtype)
    x[2, 500] = 40.0
    x[3, :100] = -float("inf")
    x[4] += 1000.0
    targets = torch.tensor([0, 1002, 500, 150, 7, int(x[5].float().argmin()), 999])
    lp, rank, lse = kernels.logprob_rows(x.contiguous(), targets)
    ref = torch.log_softmax(x.float(), dim=-1)
    want = ref.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(lp, want, atol=2e-5, rtol=1e-5)
    xf = x.float()
    assert torch.equal(rank, (xf > xf.gather(1, targets[:, None])).sum(dim=1) + 1)
    assert rank[2] == 1 and rank[5] == 1003 - (xf[5] == xf[5].min()).sum() + 1
    torch.testing.assert_close(lse, torch.logsumexp(xf, dim=-1), atol=1e-4, rtol=1e-6)
    torch_lp, torch_rank, torch_lse = TorchOps("cpu").token_logprobs(x, targets)  # the oracle family agrees
    torch.testing.assert_close(torch_lp, want, atol=2e-5, rtol=1e-5)
    assert torch.equal(torch_rank, rank)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernels.logprob_rows(x.contiguous(), torch.tensor([0, 1, 2, 3, 4, 5, 1003]))


def test_kernel_rejects_inconsistent_metadata(kernels):
    mod = kernels
    k_cache, v_cache = _caches(4, 4, 1, 16, torch.float32)
    q = torch.randn(3, 2, 16)
    tables = torch.tensor([[1, 2]])
    with pytest.raises(RuntimeError, match="query length"):  # 3 new tokens but only 2 in the sequence
        mod.paged_attention(q, k_cache, v_cache, tables, torch.tensor([2]), torch.tensor([0, 3]), 0.25)
    with pytest.raises(RuntimeError, match="num_tokens"):
        mod.paged_attention(q, k_cache, v_cache, tables, torch.tensor([5]), torch.tensor([0, 2]), 0.25)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rms_norm_kernel_matches_torch_ops(dtype, kernels):
    """Bit-equal in bf16/fp16; in float32 (the sum of squares in another order) within a few ulps. RMSNorm uses it
    in every dtype."""
    from tokenmill.model.layers import Build, RMSNorm
    from tokenmill.ops.cpu_ops import CpuOps

    torch.manual_seed(3)
    x = (torch.randn(37, 576) * 4).to(dtype)
    norm = RMSNorm(576, 1e-5, Build(CpuOps(kernels), dtype))
    norm.weight.data = torch.randn(576).to(dtype)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = kernels.rms_norm(x, norm.weight, 1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(norm(x), got)  # the module, which uses the kernel in this dtype too
    else:
        assert torch.equal(got, expected)
        assert torch.equal(norm(x), expected)  # the module, which uses the kernel in this dtype


# ----------------------------------------------------------------- varlen (packed, no cache) attention
# head_dim 16/32/64/128 take the unrolled paths, 24 the generic one; (heads, kv_heads) covers MHA and GQA
VARLEN_SHAPES = [(12, 12, 32), (4, 4, 16), (8, 2, 64), (4, 1, 128), (6, 3, 24)]


@pytest.mark.parametrize("heads,kv_heads,head_dim", VARLEN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_kernel_matches_sdpa(heads, kv_heads, head_dim, dtype, causal, kernels):
    """q/k/v as strided slices of one fused projection (as the models pass them), lengths from 1 to 257 with odd
    tails, against the per-length-group SDPA path."""
    from tokenmill.attention.packed import sdpa_packed_attention

    mod = kernels
    torch.manual_seed(heads + head_dim)
    lens = [1, 7, 16, 17, 64, 3, 257, 33, 2, 100]
    T = sum(lens)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, : heads * head_dim].view(T, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(T, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(T, kv_heads, head_dim)
    cu = torch.tensor([0, *lens]).cumsum(0)
    scale = head_dim**-0.5
    out = mod.varlen_attention(q, k, v, cu, scale, causal)
    assert out.shape == (T, heads, head_dim) and out.is_contiguous() and out.dtype == dtype
    ref = sdpa_packed_attention(q.float(), k.float(), v.float(), lens, scale, causal)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_varlen_kernel_sequences_do_not_mix(kernels):
    """Changing one sequence's keys changes no other sequence's output (bidirectional attention stays inside each)."""
    mod = kernels
    lens = [5, 9, 4]
    q, k, v = (torch.randn(sum(lens), 2, 32) for _ in range(3))
    cu = torch.tensor([0, *lens]).cumsum(0)
    before = mod.varlen_attention(q, k, v, cu, 0.2, False)
    k2 = k.clone()
    k2[5:14] += 1.0  # the middle sequence only
    after = mod.varlen_attention(q, k2, v, cu, 0.2, False)
    assert torch.equal(before[:5], after[:5]) and torch.equal(before[14:], after[14:])
    assert not torch.allclose(before[5:14], after[5:14])


def test_varlen_kernel_rejects_bad_inputs(kernels):
    mod = kernels
    q = torch.randn(10, 2, 32)
    with pytest.raises(RuntimeError, match="num_tokens"):
        mod.varlen_attention(q, q, q, torch.tensor([0, 4, 9]), 1.0, False)
    with pytest.raises(RuntimeError, match="multiple"):
        mod.varlen_attention(torch.randn(10, 3, 32), q, q, torch.tensor([0, 10]), 1.0, False)
    with pytest.raises(RuntimeError, match="dense heads"):
        mod.varlen_attention(q.transpose(1, 2).contiguous().transpose(1, 2), q, q, torch.tensor([0, 10]), 1.0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_kernel_matches_torch_ops(dtype, kernels):
    """The gated MLP's activation in one pass equals F.silu(gate) * up with torch's roundings, up to the last bit
    (its sigmoid's exp is Cephes', torch's is Sleef's): within 8 ulp of float32 (float32 rows: the exp's error goes
    through the sigmoid's division and two products), and at most one
    bfloat16 step (2^-7 relative) from torch's bfloat16 result; zero, signs and large |gate| included."""
    torch.manual_seed(11)
    gate_up = (torch.randn(37, 2 * 200) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([0.0, -0.0, 30.0, -30.0]).to(dtype)
    out = kernels.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert out.shape == ref.shape and out.dtype == dtype
    rtol = 8 * 2.0**-23 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=1e-30)
    if dtype == torch.bfloat16:
        assert (out == ref).float().mean() > 0.99  # the same roundings: nearly every value bit-equal
