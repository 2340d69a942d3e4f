"""The AMX paths (Intel Advanced Matrix Extensions) of the C++ kernels and how they are chosen.

On a CPU with AMX-BF16 the prefill tokens of long-enough requests are attended on AMX tiles
(``cpu_amx.cpp``): those tests compare them with the reference attention and run only where the machine
has AMX. What must hold on every machine runs everywhere: where AMX is missing (this CPU, or the portable build) the
AMX entry point is the per-token kernel exactly, the ops object takes AMX only where the build and the OS allow it,
and the AMX source compiles for an AMX target even on a CPU without AMX (so a build error cannot wait for an AMX
host)."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tokenmill.attention.backend import AttentionMetadata, ReferenceAttention
from tokenmill.kernels import cpu_kernel
from tokenmill.ops.cpu_ops import TILE_MIN_QUERY, CpuKernelAttention, CpuOps

CPU_FLAGS = set()
if Path("/proc/cpuinfo").exists():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            CPU_FLAGS = set(line.split(":", 1)[1].split())
            break
HOST_AMX = {"amx_tile", "amx_bf16"} <= CPU_FLAGS


def _batch(reqs, heads, kv_heads, head_dim, block_size, dtype, seed):
    """Caches with random rows, and a step's q/k/v for requests given as (context cached, new tokens)."""
    torch.manual_seed(seed)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in reqs) + 8
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim).to(dtype)
    perm = torch.randperm(num_blocks - 1) + 1  # scattered blocks; block 0 pads the tables
    max_blocks = max(-(-(c + n) // block_size) for c, n in reqs)
    qsl, seq_lens, tables, slots, used = [0], [], [], [], 0
    for context, new in reqs:
        nblocks = -(-(context + new) // block_size)
        table = perm[used:used + nblocks]
        used += nblocks
        tables.append(torch.cat([table, torch.zeros(max_blocks - nblocks, dtype=torch.int64)]))
        pos = torch.arange(context, context + new)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        qsl.append(qsl[-1] + new)
        seq_lens.append(context + new)
    t = qsl[-1]
    q = torch.randn(t, heads, head_dim).to(dtype)
    k = torch.randn(t, kv_heads, head_dim).to(dtype)
    v = torch.randn(t, kv_heads, head_dim).to(dtype)
    num_decodes = sum(1 for _, n in reqs if n == 1)
    meta = AttentionMetadata(qsl, seq_lens, num_decodes, torch.cat(slots), torch.stack(tables),
                             torch.tensor(seq_lens))
    return q, k, v, k_cache, v_cache, meta


# decodes, short chunks (per-token kernel) and long ones (tiles), chunks after cached context, lengths off the tile
# and block sizes, a chunk of exactly one tile
REQS = [(5, 1), (0, 40), (17, 33), (3, 15), (0, 16), (100, 1), (31, 70), (64, 17)]


def test_amx_entry_is_the_tiled_kernel_where_amx_is_off(kernels):
    """amx_min_q 0: paged_attention_amx returns what paged_attention returns, bit for bit; on a machine / build
    without AMX (the portable build never has it), what paged_attention_tiled returns."""
    q, k, v, k_cache, v_cache, meta = _batch(REQS, 6, 2, 64, 16, torch.bfloat16, seed=1)
    CpuKernelAttention(kernels).forward(q, k, v, k_cache, v_cache, meta, 0.125)  # writes the step's K/V
    args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), 0.125)
    assert torch.equal(kernels.paged_attention_amx(*args, 0, 0, 0.0), kernels.paged_attention(*args))
    if not kernels.amx_available():
        assert torch.equal(kernels.paged_attention_amx(*args, TILE_MIN_QUERY, 0, 0.0),
                           kernels.paged_attention_tiled(*args, TILE_MIN_QUERY))


def test_ops_take_amx_only_where_the_machine_allows_it(kernels):
    """The choice is made once, from what the build and the OS allow: never on a CPU without AMX-BF16 (whatever is
    asked), and by default wherever it is available; prefill tiles either way."""
    assert not kernels.amx_available() or HOST_AMX
    assert CpuOps(kernels).amx == kernels.amx_available()
    assert not CpuOps(kernels, amx=False).amx
    assert CpuOps(kernels, amx=True).amx == kernels.amx_available()
    assert CpuOps(kernels, amx=False).attention.amx is False
    assert CpuOps(kernels, amx=False).attention.min_q == TILE_MIN_QUERY
    assert CpuKernelAttention(kernels, tiled=False).min_q == 0


def test_amx_is_available_on_an_amx_host():
    """On a CPU with AMX-BF16 the native build has the AMX paths (the OS grants the tile state to the process)."""
    if not HOST_AMX:
        pytest.skip("this CPU has no AMX-BF16 (the AMX source is compile-checked by the next test)")
    assert cpu_kernel.load().amx_available()


def test_amx_source_compiles_for_an_amx_target():
    """The kernels' C++ (with the AMX file) type-checks for a Sapphire Rapids target on any x86-64 machine with g++,
    so code that only an AMX host compiles natively is still checked on every CI host."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ here")
    from torch.utils.cpp_extension import include_paths

    src = "\n".join(p.read_text() for p in cpu_kernel._SOURCE_FILES)
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-march=sapphirerapids", "-x", "c++", "-",
           *[f"-I{p}" for p in include_paths()], "-DTORCH_EXTENSION_NAME=tokenmill_check"]
    import sysconfig

    cmd.append(f"-I{sysconfig.get_paths()['include']}")
    proc = subprocess.run(cmd, input=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


needs_amx = pytest.mark.skipif(not HOST_AMX, reason="runs on a CPU with AMX-BF16 (this one has none)")


@needs_amx
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 32, 16), (8, 2, 128, 16),
                                                                 (6, 2, 64, 32), (6, 1, 64, 8), (4, 2, 128, 4),
                                                                 (8, 4, 256, 16)])
@pytest.mark.parametrize("window,softcap", [(None, None), (9, None), (40, 2.0), (None, 0.7)],
                         ids=["plain", "window", "window+cap", "cap"])
def test_amx_attention_matches_reference(heads, kv_heads, head_dim, block_size, window, softcap):
    """Decodes, short and long prefill chunks with and without cached context, in one step: the AMX tiles and the
    per-token kernel both equal the reference (float32 math on the bfloat16 inputs) within bfloat16 rounding, and
    the K/V the backend wrote equal the reference backend's byte for byte. Gemma's head_dim 256 (Q tiles reloaded),
    sliding windows shorter than most chunks (rows of one tile starting in different 32-key chunks) and capped
    scores on both sides of tanh's bend."""
    kernels = cpu_kernel.load()
    q, k, v, k_cache, v_cache, meta = _batch(REQS, heads, kv_heads, head_dim, block_size, torch.bfloat16,
                                             seed=heads + head_dim)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    scale = head_dim**-0.5
    ref = ReferenceAttention().forward(q.float(), k.float(), v.float(), ref_k.float(), ref_v.float(), meta, scale,
                                       window, softcap)
    ReferenceAttention().forward(q, k, v, ref_k, ref_v, meta, scale, window, softcap)
    out = CpuKernelAttention(kernels, amx=True).forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    assert torch.equal(k_cache.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), ref_v.view(torch.uint8))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    # the decodes and short chunks took the per-token kernel: identical to it
    per_token = kernels.paged_attention_windowed(q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor,
                                                 meta.query_start_loc_t(), scale, window or 0, softcap or 0.0, 0)
    short = torch.cat([torch.arange(meta.query_start_loc[i], meta.query_start_loc[i + 1])
                       for i, (_, n) in enumerate(REQS) if n < TILE_MIN_QUERY])
    assert torch.equal(out[short], per_token[short])


@needs_amx
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (8, 2, 128, 16), (8, 4, 256, 8)])
@pytest.mark.parametrize("window,softcap", [(None, None), (40, 2.0)], ids=["plain", "window+cap"])
def test_amx_attention_over_an_fp8_cache(heads, kv_heads, head_dim, block_size, window, softcap):
    """A float8 e4m3 cache (kv_cache_dtype="fp8") takes the AMX tiles too, its rows converted to bfloat16 exactly as
    the tiles are built: the tile tokens equal, bit for bit, the AMX result over a bfloat16 cache holding the same
    values; every token equals the reference over those values within bfloat16 rounding."""
    kernels = cpu_kernel.load()
    q, k, v, k_cache, v_cache, meta = _batch(REQS, heads, kv_heads, head_dim, block_size, torch.float8_e4m3fn,
                                             seed=heads + head_dim + 7)
    q, k, v = q.float().to(torch.bfloat16), k.float().to(torch.bfloat16), v.float().to(torch.bfloat16)
    scale = head_dim**-0.5
    out = CpuKernelAttention(kernels, amx=True).forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    kb, vb = k_cache.to(torch.bfloat16), v_cache.to(torch.bfloat16)  # the step's K/V included; exact
    args = (q, kb, vb, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), scale)
    same = kernels.paged_attention_amx(*args, TILE_MIN_QUERY, window or 0, softcap or 0.0)
    tiles = torch.cat([torch.arange(meta.query_start_loc[i], meta.query_start_loc[i + 1])
                       for i, (_, n) in enumerate(REQS) if n >= TILE_MIN_QUERY])
    assert torch.equal(out[tiles], same[tiles])
    ref = ReferenceAttention().forward(q.float(), k.float(), v.float(), kb.float(), vb.float(), meta, scale, window,
                                       softcap)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@needs_amx
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size", [(9, 3, 64, 16), (4, 4, 32, 16), (8, 2, 128, 16),
                                                                 (6, 1, 64, 8), (8, 4, 256, 8)])
@pytest.mark.parametrize("window,softcap", [(None, None), (9, None), (40, 2.0), (None, 0.7)],
                         ids=["plain", "window", "window+cap", "cap"])
def test_amx_float32_queries_over_an_fp8_cache(heads, kv_heads, head_dim, block_size, window, softcap):
    """Float32 queries over an fp8 cache take the AMX tiles as three bfloat16 parts each (and the probabilities too):
    the products are exact, so the tile tokens equal the vector units' float32 tiles (paged_attention_windowed)
    within float32 summation-order noise, far below bfloat16's rounding; the decodes and short chunks took the
    per-token kernel, bit for bit; every token equals the float64 reference over the cache's values."""
    kernels = cpu_kernel.load()
    q, k, v, k_cache, v_cache, meta = _batch(REQS, heads, kv_heads, head_dim, block_size, torch.float8_e4m3fn,
                                             seed=heads + head_dim + 11)
    q = torch.randn(q.shape, generator=torch.Generator().manual_seed(head_dim)) * 2  # float32, not fp8 values
    k, v = k.float(), v.float()
    scale = head_dim**-0.5
    out = CpuKernelAttention(kernels, amx=True).forward(q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    assert out.dtype == torch.float32
    args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), scale,
            window or 0, softcap or 0.0)
    vector_tiles = kernels.paged_attention_windowed(*args, TILE_MIN_QUERY)
    per_token = kernels.paged_attention_windowed(*args, 0)
    tiles = torch.cat([torch.arange(meta.query_start_loc[i], meta.query_start_loc[i + 1])
                       for i, (_, n) in enumerate(REQS) if n >= TILE_MIN_QUERY])
    short = torch.cat([torch.arange(meta.query_start_loc[i], meta.query_start_loc[i + 1])
                       for i, (_, n) in enumerate(REQS) if n < TILE_MIN_QUERY])
    torch.testing.assert_close(out[tiles], vector_tiles[tiles], atol=1e-5, rtol=1e-5)
    assert not torch.equal(out[tiles], out[tiles].bfloat16().float())  # float32 outputs, not bfloat16 ones
    assert torch.equal(out[short], per_token[short])
    kd, vd = k_cache.double(), v_cache.double()
    ref = ReferenceAttention().forward(q.double(), k.double(), v.double(), kd, vd, meta, scale, window, softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)


@needs_amx
@pytest.mark.parametrize("dtype,kv_cache_dtype,tol", [("bfloat16", "auto", 0.05), ("float32", "fp8", 1e-4)])
def test_amx_model_logits_match_the_per_token_kernel(dtype, kv_cache_dtype, tol):
    """A tiny Llama (head_dim 32, GQA) prefilled through the AMX tiles gives the greedy tokens of the per-token
    kernel, with their logprobs within bfloat16 noise in bfloat16, and within float32 noise for a float32 model over
    an fp8 cache (its queries and probabilities in three bfloat16 parts: exact products). Where the two runs pick
    different tokens, both runs must see the two as a tie within that noise (a random tiny model's bfloat16 logits
    tie often: they are 2^-6 apart at its logprobs), and the rest of the sequence is not compared."""
    import tempfile

    from helpers import save_tiny_model

    from tokenmill import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        save_tiny_model("llama", Path(d), head_dim=32)
        prompts = [[(7 * i + 3 * j) % 250 + 3 for j in range(40 + 13 * i)] for i in range(4)]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
        outs = {}
        for amx in (False, True):
            llm = LLM(d, dtype=dtype, kv_cache_dtype=kv_cache_dtype, ops=CpuOps(cpu_kernel.load(), amx=amx))
            assert llm.engine.ops.amx == amx
            outs[amx] = llm.generate(prompts, params, use_tqdm=False)
        diverged = 0
        for a, b in zip(outs[False], outs[True]):
            for ta, tb, la, lb in zip(a.token_ids, b.token_ids, a.logprobs, b.logprobs):
                if ta != tb:  # a near tie, seen as one by both runs
                    assert tb in la and ta in lb, (la, lb)
                    assert abs(la[ta] - la[tb]) < tol and abs(lb[ta] - lb[tb]) < tol, (la, lb)
                    diverged += 1
                    break
                assert abs(la[ta] - lb[ta]) < tol
        assert diverged <= 1  # a tie now and then, not a habit


def _int8_weight(n, k, kernels, amx, seed=0):
    from tokenmill.model.weight_only import Int8Weight

    torch.manual_seed(seed)
    w = Int8Weight(n, k, kernels, amx=amx)
    w.load_rows(0, torch.randn(n, k) * 0.05 + 0.01)
    w.finalize(torch.bfloat16)
    return w


def test_int8_amx_entry_is_int8g_gemm_where_amx_is_off(kernels):
    """Without AMX (this CPU, or the portable build) int8g_gemm_amx is int8g_gemm bit for bit; the weight takes the
    AMX kernel only where the ops object chose AMX."""
    w = _int8_weight(40, 64, kernels, amx=False)
    x = torch.randn(21, 64).to(w.x_dtype)
    a, b = torch.empty(21, 40), torch.empty(21, 40)
    kernels.int8g_gemm(x, w.packed, w.scales, None, None, a)
    kernels.int8g_gemm_amx(x, w.packed, w.scales, None, None, b)
    if not kernels.amx_available() or x.dtype == torch.float32:
        assert torch.equal(a, b)
    assert not CpuOps(kernels, amx=False).amx and not _int8_weight(8, 32, kernels, amx=False).amx


@needs_amx
@pytest.mark.parametrize("m,n,k", [(1, 32, 32), (17, 40, 96), (128, 96, 576), (50, 300, 1536)])
def test_int8_amx_gemm_matches_its_dequantized_weights(m, n, k):
    """int8g_gemm_amx (rows not a multiple of 16, channels not a multiple of 32, bias and residual) equals x times the
    weight dequantized and rounded to bfloat16 once (its documented arithmetic), within float32 summation order, and
    the exact AVX-512 path within that one rounding."""
    kernels = cpu_kernel.load()
    w = _int8_weight(n, k, kernels, amx=True, seed=m + n)
    assert w.amx
    x = torch.randn(m, k).bfloat16()
    bias, res = torch.randn(n).bfloat16(), torch.randn(m, n).bfloat16()
    y = w(x, bias, res).float()
    wq = w.groups().dequantize().bfloat16().float()  # [n, k], rounded once
    ref = x.float() @ wq.t() + bias.float() + res.float()
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=1e-2)
    exact = torch.empty(m, n, dtype=torch.bfloat16)
    kernels.int8g_gemm(x, w.packed, w.scales, bias, res, exact)
    torch.testing.assert_close(y, exact.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("m,n,k", [(1, 32, 64), (37, 48, 96), (128, 96, 576)])
def test_int4_takes_the_int8_amx_gemm_where_amx_is_on(m, n, k, kernels):
    """int4 weights with amx: on an AMX build, held as int8 groups (codes q - 8) in int8g_gemm's panels and
    multiplied on AMX, equal to x times the 4-bit weights rounded once to bfloat16, and to torch's int4 kernel within
    bfloat16 rounding; elsewhere torch's kernel. A scale float16 cannot hold keeps torch's kernel on any build."""
    from tokenmill.model.quant import quantize_int4_groups
    from tokenmill.model.weight_only import Int4Weight

    torch.manual_seed(m + n + k)
    w = torch.randn(n, k) * 0.05
    layers = {}
    for amx in (False, True):
        layers[amx] = Int4Weight(n, k, kernels, amx=amx)
        layers[amx].load_rows(0, w)
        layers[amx].finalize(torch.bfloat16)
    assert layers[False].panels is None
    assert (layers[True].panels is not None) == kernels.amx_available()
    x = torch.randn(m, k).bfloat16()
    bias, res = torch.randn(n).bfloat16(), torch.randn(m, n).bfloat16()
    y = layers[True](x, bias, res).float()
    wq = quantize_int4_groups(w).dequantize().bfloat16().float()  # [n, k]
    torch.testing.assert_close(y, x.float() @ wq.t() + bias.float() + res.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y, layers[False](x, bias, res).float(), atol=6e-2, rtol=3e-2)
    tiny = Int4Weight(n, k, kernels, amx=True)
    tiny.load_rows(0, w * 1e-5)  # scales below float16's normal range
    tiny.finalize(torch.bfloat16)
    assert tiny.panels is None and tiny.packed is not None


HOST_AMX_INT8 = HOST_AMX and "amx_int8" in CPU_FLAGS


@pytest.mark.parametrize("m", [1, 7, 8, 16, 17, 31, 32, 33, 64, 65, 100, 130])
@pytest.mark.parametrize("n,k,dtype", [(960, 576, torch.bfloat16), (100, 64, torch.float32), (200, 640, torch.bfloat16),
                                       (64, 1540, torch.bfloat16)])
def test_w8a8_amx_gemm_equals_the_vnni_gemm(m, n, k, dtype, kernels):
    """int8_gemm_amx equals int8_gemm bit for bit on every machine: on AMX-INT8 tiles (rows 8 and up, K a multiple of
    64: whole and partial row tiles, two row tiles and one, channels past a panel's 64 and past 32 in it, bias and
    residual) the int32 sums are the same integers and the epilogue is the same code; elsewhere (this CPU without
    AMX, fewer rows, K = 1540) it is int8_gemm itself. Channels 960: 15 panels over the threads."""
    if not kernels.int8_gemm_available():
        pytest.skip("this build has no AVX512-VNNI int8_gemm")
    g = torch.Generator().manual_seed(m * 7 + n + k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed, comp = kernels.int8_pack_weight(w)
    ws = torch.rand(n, generator=g) / 100
    x = torch.randn(m, k, generator=g).to(dtype)
    u, xs, xlo = kernels.quantize_rows_uint8(x)
    bias, res = torch.randn(n, generator=g).to(dtype), torch.randn(m, n, generator=g).to(dtype)
    for b, r in ((None, None), (bias, res)):
        vnni, amx = torch.empty(m, n, dtype=dtype), torch.empty(m, n, dtype=dtype)
        kernels.int8_gemm(u, packed, comp, xs, xlo, ws, b, r, vnni)
        kernels.int8_gemm_amx(u, packed, comp, xs, xlo, ws, b, r, amx)
        assert torch.equal(vnni, amx)


def test_w8a8_takes_the_amx_gemm_where_the_ops_chose_amx(kernels, monkeypatch):
    """A w8a8 layer calls int8_gemm_amx exactly when it was built with amx (the ops object's choice), int8_gemm
    otherwise; both give the same output."""
    from tokenmill.model.w8a8 import W8A8Weight

    if not kernels.int8_gemm_available():
        pytest.skip("this build has no AVX512-VNNI int8_gemm")
    torch.manual_seed(3)
    w = torch.randn(96, 128) * 0.05
    x = torch.randn(20, 128).bfloat16()
    outs, called = {}, []
    for amx in (False, True):
        layer = W8A8Weight(96, 128, kernels, amx=amx)
        layer.load_rows(0, w)
        layer.finalize(torch.bfloat16)

        class Spy:  # the module's functions, recording which GEMM the layer calls
            def __getattr__(self, name):
                if name.startswith("int8_gemm"):
                    called.append(name)
                return getattr(kernels, name)

        layer.kernels = Spy()
        outs[amx] = layer(x, None)
    assert called == ["int8_gemm", "int8_gemm_amx"]
    assert torch.equal(outs[False], outs[True])


@pytest.mark.skipif(not HOST_AMX_INT8, reason="runs on a CPU with AMX-INT8 (this one has none)")
def test_w8a8_amx_gemm_is_built_on_an_amx_int8_host():
    """On an AMX-INT8 host the native build has the tile path (so the bit-equality above compares two kernels there,
    not int8_gemm with itself)."""
    assert cpu_kernel.load().amx_int8_available()


needs_amx_int8 = pytest.mark.skipif(not HOST_AMX_INT8, reason="runs on a CPU with AMX-INT8 (this one has none)")


@needs_amx_int8
@pytest.mark.parametrize("m", [1, 5, 16, 33, 128])
@pytest.mark.parametrize("n", [49152, 1000, 64, 70])
def test_int8_gemm_argmax_is_the_argmax_of_the_float32_output(m, n):
    """int8_gemm_argmax gives torch.argmax of int8_gemm's float32 output (the logits it never writes), rows of any
    count, channels past a panel's end; ties keep the first channel: rows made of one repeated weight row tie
    everywhere (argmax 0), and a row whose maximum sits in two panels takes the earlier."""
    kernels = cpu_kernel.load()
    g = torch.Generator().manual_seed(m + n)
    k = 576
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w[n // 2] = w[n // 3]  # the same channel twice, in two panels when n > 192
    ws = torch.rand(n, generator=g) / 100
    ws[n // 2] = ws[n // 3]
    packed, comp = kernels.int8_pack_weight(w)
    x = torch.randn(m, k, generator=g).bfloat16()
    u, xs, xlo = kernels.quantize_rows_uint8(x)
    logits = torch.empty(m, n)
    kernels.int8_gemm_amx(u, packed, comp, xs, xlo, ws, None, None, logits)
    assert torch.equal(kernels.int8_gemm_argmax(u, packed, comp, xs, xlo, ws, n), logits.argmax(dim=1))
    flat = torch.randint(-127, 128, (1, k), dtype=torch.int8, generator=g).expand(n, k).contiguous()
    p2, c2 = kernels.int8_pack_weight(flat)
    assert torch.equal(kernels.int8_gemm_argmax(u, p2, c2, xs, xlo, torch.full((n,), 0.01), n),
                       torch.zeros(m, dtype=torch.int64))
    # the tied pair: boost it so it is every row's maximum; the first of the two wins
    w2 = w.clone()
    w2[n // 3] = w2[n // 2] = 127
    ws2 = ws.clone()
    ws2[n // 3] = ws2[n // 2] = 10.0
    p3, c3 = kernels.int8_pack_weight(w2)
    x_pos = torch.rand(m, k, generator=g).bfloat16() + 0.5  # positive inputs: the all-127 rows win
    u3, xs3, xlo3 = kernels.quantize_rows_uint8(x_pos)
    top = kernels.int8_gemm_argmax(u3, p3, c3, xs3, xlo3, ws2, n)
    assert torch.equal(top, torch.full((m,), min(n // 3, n // 2), dtype=torch.int64))


def test_greedy_steps_of_a_w8a8_model_skip_the_logits_and_keep_their_tokens(tmp_path, monkeypatch):
    """A w8a8 model's all-greedy steps take the fused head where it runs (AMX-INT8; elsewhere greedy_tokens says
    None and the logits path runs): the same tokens as the logits path (the fused head switched off) over a busy
    batch with chunked prefill; a step holding a request that asks for logprobs or samples keeps the logits path."""
    from helpers import save_tiny_model
    from tokenmill import LLM, SamplingParams
    from tokenmill.model.llama import LlamaForCausalLM

    save_tiny_model("llama", tmp_path / "m")
    prompts = [[(7 * i + j) % 250 + 3 for j in range(5 + 9 * i)] for i in range(12)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    calls = []
    fused_head = LlamaForCausalLM.greedy_tokens

    def spy(self, hidden):
        out = fused_head(self, hidden)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "greedy_tokens", spy)
    llm = LLM(str(tmp_path / "m"), dtype="bfloat16", quantization="w8a8", kv_cache_memory=0.05,
              cache_dir=str(tmp_path), max_num_batched_tokens=64)
    fused = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    kernels = cpu_kernel.load()
    assert calls and set(calls) == {kernels is not None and kernels.amx_int8_available()}
    mixed_params = [greedy] * 11 + [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)]
    mixed = llm.generate(prompts, mixed_params, use_tqdm=False)
    # every token of the logprobs request has its entry: no step holding it took the fused head (which returns none)
    lps = mixed[-1].outputs[0].logprobs
    assert len(lps) == 12 and all(len(e) >= 2 for e in lps)
    monkeypatch.setattr(LlamaForCausalLM, "greedy_tokens", lambda self, hidden: None)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert fused == plain
    assert [o.outputs[0].token_ids for o in mixed] == plain
