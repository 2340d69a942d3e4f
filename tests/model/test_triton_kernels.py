"""The Triton kernels (``tokenmill/kernels/triton/``) against their torch oracles. Without a GPU they run here under
Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py) on CPU tensors, so they never skip; the interpreter
has no bfloat16 arithmetic, hence float32 and float16. Then a greedy end-to-end check: tiny models through the whole
Triton path equal transformers and the CPU path token for token."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import assert_greedy_equal, hf_greedy, save_tiny_model
from tokenmill import LLM, SamplingParams
from tokenmill.attention.backend import AttentionMetadata, ReferenceAttention, write_kv
from tokenmill.config import ConfigError
from tokenmill.ops import make_ops
from tokenmill.ops.torch_ops import TorchOps

pytest.importorskip("triton")  # a test dependency (pyproject's test extra); listed so a bare checkout says why
from tokenmill.kernels.triton.paged_attention import choose_num_splits, paged_attention  # noqa: E402
from tokenmill.ops.triton_ops import TritonAttention, TritonOps  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def paged_case(seed: int, heads: int, kv_heads: int, head_dim: int, block_size: int, q_lens: list[int],
               contexts: list[int], dtype: torch.dtype, cache_dtype: torch.dtype | None = None,
               index_dtype: torch.dtype = torch.int64):
    """A step over a paged cache: requests' blocks scattered over a pool twice as large as needed (holes between them,
    in random order), block tables padded with a live block's id (a kernel reading past a request's last block would
    read real data and fail the comparison), random K/V already in the cache and the step's q."""
    g = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(q_lens, contexts)]
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = 2 * sum(needed) + 3
    order = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), max(needed) + 2), int(order[-1]), dtype=index_dtype)
    used = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[used:used + 2 * n:2]  # every other block of the shuffled pool
        used += 2 * n
    cache_dtype = cache_dtype or dtype
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(cache_dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=g).to(cache_dtype).to(DEVICE)
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    q = torch.randn(qsl[-1], heads, head_dim, generator=g).to(dtype).to(DEVICE)
    meta = AttentionMetadata(qsl, seq_lens, sum(1 for x in q_lens if x == 1), torch.empty(0, dtype=torch.int64),
                             tables.to(DEVICE), torch.tensor(seq_lens, device=DEVICE))
    return q, k_cache, v_cache, meta


def reference_attention(q, k_cache, v_cache, meta, scale, window=None, softcap=None):
    out = torch.empty_like(q)
    for i in range(meta.num_reqs):
        ReferenceAttention._prefill_one(i, q.cpu(), k_cache.cpu(), v_cache.cpu(), _on_cpu(meta), scale, out, window,
                                        softcap)
    return out


def _on_cpu(meta):
    return AttentionMetadata(meta.query_start_loc, meta.seq_lens, meta.num_decodes, meta.slot_mapping.cpu(),
                             meta.block_tables.cpu().long(), meta.seq_lens_tensor.cpu())


CASES = {  # name: (heads, kv_heads, head_dim, block_size, q_lens, contexts)
    "decodes": (4, 2, 32, 4, [1, 1, 1, 1], [7, 0, 30, 13]),
    "mha-prefill": (4, 4, 16, 4, [9, 3, 1], [0, 0, 0]),
    "gqa3-mixed": (9, 3, 64, 16, [1, 1, 20, 33], [40, 3, 17, 0]),  # SmolLM2's 9 heads over 3 KV heads
    "mqa-prefix-hit": (8, 1, 32, 8, [1, 12, 5], [100, 24, 61]),  # chunks after cached context: causal offset
    "head-dim-80": (6, 2, 80, 16, [33, 1], [0, 70]),  # not a power of two: masked lanes
    "long-chunk": (4, 2, 32, 16, [70, 1, 1], [5, 150, 0]),  # more query tokens than one program's BLOCK_Q
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_matches_the_reference(name, dtype):
    heads, kv_heads, head_dim, block_size, q_lens, contexts = CASES[name]
    q, kc, vc, meta = paged_case(len(name), heads, kv_heads, head_dim, block_size, q_lens, contexts, dtype)
    scale = head_dim**-0.5
    ref = reference_attention(q, kc, vc, meta, scale)
    out = paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), scale,
                          max(q_lens))
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 4, 8])
def test_split_kv_decode_matches_the_reference(num_splits):
    """Flash-decoding: each split walks part of the keys; some splits of the short requests get no tile at all."""
    q, kc, vc, meta = paged_case(num_splits, 8, 2, 64, 16, [1, 1, 1, 1], [300, 17, 0, 129], torch.float32)
    ref = reference_attention(q, kc, vc, meta, 0.125)
    out = paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), 0.125, 1,
                          num_splits)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


def test_split_kv_also_serves_prefill_chunks():
    """The split path is the same kernel: a mixed step split four ways equals the unsplit one."""
    q, kc, vc, meta = paged_case(5, 4, 2, 32, 8, [1, 19, 6], [50, 0, 40], torch.float32)
    args = (q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), 32**-0.5, 19)
    torch.testing.assert_close(paged_attention(*args, num_splits=4), paged_attention(*args), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("window,softcap", [(17, None), (1, None), (None, 2.0), (40, 1.5)],
                         ids=["window", "window-1", "softcap", "both"])
def test_sliding_windows_and_capped_scores_match_the_reference(window, softcap, dtype):
    """Gemma's local layers and Mistral's window in the kernel itself: decodes past the window, a 70-token chunk
    whose later rows start past its first tile (the program skips tiles no row sees), a chunk after cached context,
    a short prompt the window does not reach; scores capped before the softmax (both sides of tanh's bend)."""
    q, kc, vc, meta = paged_case(23, 9, 3, 32, 16, [1, 1, 70, 9, 4], [100, 3, 40, 130, 0], dtype)
    q = q * 3  # scores well past the cap
    scale = 32**-0.5
    ref = reference_attention(q, kc, vc, meta, scale, window, softcap)
    out = paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), scale, 70,
                          window=window, softcap=softcap)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [2, 8])
def test_split_kv_decode_with_a_window(num_splits):
    """Split-KV shares out only the tiles inside the window; splits left without a visible key weigh nothing."""
    q, kc, vc, meta = paged_case(num_splits + 40, 8, 2, 64, 16, [1, 1, 1], [300, 17, 129], torch.float32)
    ref = reference_attention(q, kc, vc, meta, 0.125, 100, 5.0)
    out = paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), 0.125, 1,
                          num_splits, window=100, softcap=5.0)
    torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("counts", [[5, 0, 17, 1, 40], [0, 0, 3, 0], [1, 1, 1, 1, 1, 1, 1, 1], [130]],
                         ids=["mixed", "one-of-four", "decode", "one-expert-many-blocks"])
def test_grouped_expert_gemms_match_each_experts_matmul(counts, dtype):
    """The fused-MoE shape: rows grouped by expert, one launch per projection; experts no row chose, runs shorter
    than a block, runs of several blocks, widths that are not multiples of the tiles."""
    from tokenmill.kernels.triton.grouped import grouped_linear
    from tokenmill.kernels.triton.moe import fused_experts

    g = torch.Generator().manual_seed(len(counts))
    xs = (torch.randn(sum(counts), 40, generator=g) / 4).to(dtype).to(DEVICE)
    w13 = (torch.randn(len(counts), 2 * 36, 40, generator=g) / 4).to(dtype).to(DEVICE)
    w2 = (torch.randn(len(counts), 40, 36, generator=g) / 4).to(dtype).to(DEVICE)
    ops = TorchOps(DEVICE)
    want_h, want_y, start = [], [], 0
    for e, c in enumerate(counts):  # each expert's rows through torch's matmul and silu_mul
        x = xs[start:start + c]
        h = (x.float() @ w13[e].float().T).to(dtype)
        want_h.append(h)
        want_y.append((ops.silu_mul(h).float() @ w2[e].float().T).to(dtype))
        start += c
    torch.testing.assert_close(grouped_linear(xs, counts, w13).cpu(), torch.cat(want_h).cpu(), **TOL[dtype])
    torch.testing.assert_close(fused_experts(xs, counts, w13, w2).cpu(), torch.cat(want_y).cpu(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_lora_updates_as_grouped_gemms_equal_the_per_run_matmuls(dtype):
    """The Triton family's LoRA update: every adapter's run of rows shrunk in one launch and expanded, added to the
    layer's output, in another; rows of the base model (between and after the runs) untouched. Against the torch
    path (two matmuls per run) on the same factors: adapters of different ranks (zero-padded), one adapter in two
    runs (decodes, then prefills), a run longer than a block."""
    from tokenmill.model.lora import LoraSet, LoraWeights

    g = torch.Generator().manual_seed(3)
    a = (torch.randn(3, 8, 40, generator=g) / 4).to(dtype).to(DEVICE)  # [adapters, R, in]
    a[1, 4:] = 0  # a rank-4 adapter padded to 8
    b = (torch.randn(3, 56, 8, generator=g) / 4).to(dtype).to(DEVICE)  # [adapters, out, R]
    x = (torch.randn(45, 40, generator=g) / 4).to(dtype).to(DEVICE)
    y0 = torch.randn(45, 56, generator=g).to(dtype).to(DEVICE)
    adapters = ["p", None, "q", "p", "r", None]
    qsl = [0, 3, 5, 9, 30, 44, 45]  # request i: rows qsl[i]:qsl[i + 1]
    outs = {}
    for grouped in (False, True):
        loras = LoraSet(["p", "q", "r"], DEVICE if grouped else None)
        loras.set_step(adapters, qsl)
        assert (loras.blocks is not None) == grouped and len(loras.groups) == 4
        outs[grouped] = LoraWeights(a, b, loras).add_to(x, y0.clone())
    torch.testing.assert_close(outs[True].cpu(), outs[False].cpu(), **TOL[dtype])
    base_rows = [3, 4, 44]
    assert torch.equal(outs[True][base_rows].cpu(), y0[base_rows].cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_paged_attention_reads_the_fp8_cache_exactly(dtype):
    q, kc, vc, meta = paged_case(11, 4, 2, 32, 16, [1, 7, 1], [30, 20, 45], dtype, torch.float8_e4m3fn)
    ref = reference_attention(q, kc, vc, meta, 32**-0.5)  # reads the float8 values back exactly, then attends
    out = paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, meta.query_start_loc_t(), 32**-0.5, 7)
    torch.testing.assert_close(out.cpu(), ref, **TOL[dtype])


def test_paged_attention_takes_int32_block_tables():
    q, kc, vc, meta = paged_case(3, 4, 2, 16, 4, [1, 5], [9, 2], torch.float32, index_dtype=torch.int32)
    out = paged_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor.int(), meta.query_start_loc_t().int(),
                          0.25, 5)
    torch.testing.assert_close(out.cpu(), reference_attention(q, kc, vc, meta, 0.25), **TOL[torch.float32])


def test_the_attention_backend_stores_and_attends_like_the_reference():
    """TritonAttention.forward on a mixed step: the cache bytes it writes equal ReferenceAttention's index_copy_, a
    slot of -1 (a padding row) is not written, and the outputs agree."""
    for cache_dtype in (torch.float32, torch.float8_e4m3fn):
        q, kc, vc, meta = paged_case(7, 4, 2, 16, 4, [1, 6, 1], [10, 3, 0], torch.float32, cache_dtype)
        g = torch.Generator().manual_seed(1)
        k = torch.randn(q.shape[0], 2, 16, generator=g).to(DEVICE)
        v = torch.randn(q.shape[0], 2, 16, generator=g).to(DEVICE)
        slots = []  # the new tokens are the last of each request
        for i in range(meta.num_reqs):
            for pos in range(meta.seq_lens[i] - (meta.query_start_loc[i + 1] - meta.query_start_loc[i]),
                             meta.seq_lens[i]):
                slots.append(int(meta.block_tables[i, pos // 4]) * 4 + pos % 4)
        meta.slot_mapping = torch.tensor(slots, device=DEVICE)
        ref_k, ref_v = kc.clone(), vc.clone()
        ref = ReferenceAttention().forward(q.cpu(), k.cpu(), v.cpu(), ref_k.cpu(), ref_v.cpu(), _on_cpu(meta), 0.25)
        out = TritonAttention().forward(q, k, v, kc, vc, meta, 0.25)
        assert torch.equal(kc.cpu().view(torch.uint8), ref_k.cpu().view(torch.uint8))
        assert torch.equal(vc.cpu().view(torch.uint8), ref_v.cpu().view(torch.uint8))
        torch.testing.assert_close(out.cpu(), ref, **TOL[torch.float32])


def test_store_kv_skips_padding_slots():
    from tokenmill.kernels.triton.kv_store import store_kv

    for dtype in (torch.float32, torch.float16, torch.float8_e4m3fn):
        kc = torch.zeros(6, 4, 3, 8, dtype=dtype, device=DEVICE)
        vc = torch.zeros_like(kc)
        k, v = torch.randn(5, 3, 8, device=DEVICE), torch.randn(5, 3, 8, device=DEVICE)
        slots = torch.tensor([13, -1, 2, 23, -1], device=DEVICE)
        store_kv(k, v, kc, vc, slots)
        ref_k, ref_v = torch.zeros_like(kc), torch.zeros_like(vc)
        real = slots >= 0
        write_kv(k[real], v[real], ref_k, ref_v, slots[real])
        assert torch.equal(kc.view(torch.uint8), ref_k.view(torch.uint8)), dtype
        assert torch.equal(vc.view(torch.uint8), ref_v.view(torch.uint8)), dtype


def test_choose_num_splits():
    assert choose_num_splits(128, 8, 4096) == 1  # a full batch already fills the machine
    assert choose_num_splits(4, 2, 100) == 1  # too few keys to split
    assert choose_num_splits(4, 2, 4096) == 16  # 8 programs -> 128, each split 256 keys
    assert choose_num_splits(1, 8, 1024) == 4  # capped by min_keys_per_split
    attn = TritonAttention(num_programs_target=64, min_keys_per_split=16)
    q, kc, vc, meta = paged_case(2, 4, 2, 16, 4, [1, 1], [70, 40], torch.float32)
    meta.slot_mapping = torch.tensor([int(meta.block_tables[0, 17]) * 4 + 2, int(meta.block_tables[1, 10]) * 4],
                                     device=DEVICE)
    k = torch.zeros(2, 2, 16, device=DEVICE)
    ref = reference_attention(q, kc.clone(), vc.clone(), meta, 0.25)  # K/V rewritten below with zeros: compare after
    out = attn.forward(q, k, k, kc, vc, meta, 0.25)  # a split decode step
    torch.testing.assert_close(out.cpu(), reference_attention(q, kc, vc, meta, 0.25), **TOL[torch.float32])
    assert not torch.allclose(out.cpu(), ref)  # the step's own K/V (zeros) really were stored and attended


# ---------------------------------------------------------------- the small kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_rms_norm_rope_and_silu_mul_match_torch_ops(dtype):
    ours, ref = TritonOps(DEVICE), TorchOps(DEVICE)
    g = torch.Generator().manual_seed(0)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)  # sums' order

    def close(a, b):
        torch.testing.assert_close(a, b, **tol)

    for rows, dim in ((7, 96), (300, 64), (1, 576)):
        x = torch.randn(rows, dim, generator=g).to(dtype).to(DEVICE)
        w = torch.randn(dim, generator=g).to(dtype).to(DEVICE)
        close(ours.rms_norm(x, w, 1e-5), ref.rms_norm(x, w, 1e-5))
    heads_view = torch.randn(5, 3 * 40, generator=g).to(dtype).to(DEVICE)[:, :80].view(5, 2, 40)  # strided rows
    close(ours.rms_norm(heads_view, w[:40], 1e-6), ref.rms_norm(heads_view, w[:40], 1e-6))

    gate_up = torch.randn(9, 2 * 1100, generator=g).to(dtype).to(DEVICE)  # two column tiles
    close(ours.silu_mul(gate_up), ref.silu_mul(gate_up))

    for heads, kv_heads, head_dim in ((9, 3, 64), (4, 4, 80)):
        qkv = torch.randn(6, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype).to(DEVICE)
        q = qkv[:, :heads * head_dim].view(6, heads, head_dim)  # views of the fused projection, as in the model
        k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(6, kv_heads, head_dim)
        pos = torch.tensor([0, 1, 2, 50, 51, 200], dtype=torch.float32)
        freqs = torch.outer(pos, 1 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(dtype).to(DEVICE), emb.sin().to(dtype).to(DEVICE)
        rq, rk = ref.rope(q.clone(), k.clone(), cos, sin)
        oq, ok = ours.rope(q, k, cos, sin)
        close(oq, rq)
        close(ok, rk)
        close(qkv[:, :heads * head_dim].view(6, heads, head_dim), rq)  # in place


def test_make_ops_names_the_triton_family_and_why_it_cannot_run(monkeypatch):
    assert isinstance(make_ops("triton", DEVICE), TritonOps)
    if DEVICE.type == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
            make_ops("triton", "cpu")
        assert make_ops("auto", "cpu").name in ("cpu_kernel", "torch")  # never the interpreter on its own


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("arch", ["llama3_tied", "qwen3", "gemma2", "qwen2_moe"])
def test_tiny_models_through_the_triton_path_equal_transformers_and_the_cpu_path(arch, tmp_path):
    """Chunked prefill (7-token chunks), decodes and prefill in the same steps, recompute preemption: every kernel of
    the Triton family (interpreted here) in a busy batch. Tokens equal transformers' greedy ones in float32 and the
    CPU path's."""
    hf_model = save_tiny_model(arch, tmp_path)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(1, 40))] for _ in range(8)]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    refs = [hf_greedy(hf_model, p, 6) for p in prompts]
    options = dict(block_size=4, num_kv_blocks=24, max_model_len=64, max_num_seqs=8, max_num_batched_tokens=32,
                   prefill_chunk_size=7, preemption_mode="recompute")
    llm = LLM(str(tmp_path), attention_backend="triton", **options)
    assert llm.engine.ops.name == "triton"
    moe = [m for m in llm.engine.runner.model.modules() if hasattr(m, "stacked")]
    assert all(m.stacked is not None for m in moe) and (len(moe) > 0) == arch.endswith("moe")  # grouped GEMMs
    outs = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert llm.engine.stats.num_preemptions > 0
    cpu = [o.token_ids for o in LLM(str(tmp_path), **options).generate(prompts, params, use_tqdm=False)]
    for i, (out, (ref, ref_logits)) in enumerate(zip(outs, refs)):
        assert_greedy_equal(out, ref, ref_logits, f"{arch}/triton prompt {i}")
    assert outs == cpu


def test_the_self_check_auto_runs_before_choosing_triton_passes_here_and_catches_a_wrong_kernel(monkeypatch):
    ops = TritonOps(DEVICE)
    ops.self_check()
    monkeypatch.setattr(ops, "silu_mul", lambda gate_up: TorchOps.silu_mul(ops, gate_up) * 1.1)
    with pytest.raises(RuntimeError, match="silu_mul disagrees"):
        ops.self_check()
