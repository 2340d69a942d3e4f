"""The sampler: greedy rows, draws from the filtered distribution, seeds private to their request, logprobs."""

import numpy as np
import pytest
import torch

from tokenmill.model.sampler import Sampler, seeded_uniforms
from tokenmill.sampling_params import SamplingParams

CPU = torch.device("cpu")


def test_sampler_filters_collapse_to_greedy_and_seeds_are_private():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=5)]
    out = sampler(logits, params)
    greedy = logits.argmax(-1).tolist()
    assert out.token_ids[:3] == greedy[:3]
    # the seeded row draws the same token whatever else is in the batch
    alone = Sampler(seed=123, device=torch.device("cpu"))(logits[3:], params[3:])
    assert alone.token_ids[0] == out.token_ids[3]


def test_sampler_top_k_never_leaves_the_top_k():
    torch.manual_seed(1)
    logits = torch.randn(1, 1000)
    top3 = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    draws = {sampler(logits, [SamplingParams(temperature=2.0, top_k=3)]).token_ids[0] for i in range(200)}
    assert draws <= top3 and len(draws) == 3


def test_sampler_on_bfloat16_logits_equals_their_float32_widening():
    """The runner hands the sampler bfloat16 logits as the LM head computed them: greedy, seeded and logprob rows
    must come out exactly as from the same values widened to float32 (the widening is exact)."""
    torch.manual_seed(2)
    logits = torch.randn(5, 3000).to(torch.bfloat16)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=3),
              SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=1.0, top_p=0.9, seed=4),
              SamplingParams(temperature=0.0)]
    out16 = Sampler(seed=0, device=torch.device("cpu"))(logits, params)
    out32 = Sampler(seed=0, device=torch.device("cpu"))(logits.float(), params)
    assert out16.token_ids == out32.token_ids
    assert out16.logprobs == out32.logprobs and out16.logprobs[2] is not None
    assert out16.token_ids[0] == logits[0].float().argmax().item()


def _filtered(logits: torch.Tensor, p: SamplingParams) -> np.ndarray:
    """The distribution a row must be drawn from, written out plainly: temperature, top-k, then top-p."""
    probs = torch.softmax(logits.double() / p.temperature, dim=-1).numpy()
    order = np.argsort(-probs, kind="stable")
    if p.top_k:  # top-k first, renormalised: top-p applies to what top-k kept (as vLLM does)
        probs = np.where(np.isin(np.arange(len(probs)), order[: p.top_k]), probs, 0.0)
        probs /= probs.sum()
    keep = np.zeros_like(probs, dtype=bool)
    mass = 0.0
    for t in order:
        if probs[t] == 0:
            break
        keep[t] = True
        mass += probs[t]
        if mass >= p.top_p:
            break
    out = np.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, top_k=6, top_p=0.9),
])
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("candidates", [None, 0, 4])
@pytest.mark.parametrize("family", ["torch", "cpu"])
def test_draws_follow_the_filtered_distribution(params, seeded, candidates, family):
    """4000 draws of one 12-token row: each token's frequency within 4.5 sigma of its filtered probability, and
    tokens the filters drop never drawn. Seeded: one request per seed (each at output position 0); unseeded: the
    sampler's own generator. ``candidates``: the CPU default (256, more than the vocabulary), a full sort (CUDA's
    way), and 4 (the top-4 path, with the rows it does not cover drawn again over the sort). ``family``: drawn by
    torch ops or by the C++ kernels (CpuOps.sample_plain / sample_filtered, which take no candidates)."""
    torch.manual_seed(3)
    logits = torch.randn(1, 12) * 1.5
    expected = _filtered(logits[0], params)
    n = 4000
    plain = None
    if family == "cpu":
        from tokenmill.kernels import cpu_kernel
        from tokenmill.ops.cpu_ops import CpuOps

        ops = CpuOps(cpu_kernel.load())
        plain, filtered = ops.sample_plain, ops.sample_filtered
    else:
        filtered = None
    sampler = Sampler(seed=11, device=CPU, top_candidates=candidates, sample_plain=plain, sample_filtered=filtered)
    if seeded:
        rows = [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(n)]
        tokens = sampler(logits.expand(n, -1), rows, [0] * n).token_ids
    else:
        tokens = sampler(logits.expand(n, -1), [params] * n).token_ids
    counts = np.bincount(tokens, minlength=12)
    assert counts[expected == 0].sum() == 0
    sigma = np.sqrt(n * expected * (1 - expected))
    assert np.all(np.abs(counts - n * expected) <= 4.5 * sigma + 1), (counts, n * expected)


def test_a_seeded_request_depends_on_its_seed_and_position_only():
    """The same seed at the same output position draws the same token whatever the batch, the step or the
    sampler; another position (the request's next token) draws afresh."""
    torch.manual_seed(4)
    logits = torch.randn(6, 400)
    p = SamplingParams(temperature=1.0, seed=42)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=20),
              SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.5, top_p=0.5),
              SamplingParams(temperature=1.0, logprobs=2)]
    alone = Sampler(seed=0, device=CPU)(logits[2:3], [p], [9]).token_ids[0]
    busy = Sampler(seed=5, device=CPU)
    busy(logits, [others[0], others[1], others[2], others[3], others[4], others[0]], [0] * 6)  # an earlier step
    out = busy(logits, others[:2] + [p] + others[2:], [3, 1, 9, 4, 0, 2]).token_ids
    assert out[2] == alone
    flat = torch.zeros(1, 400)  # uniform row: the token is a pure function of the uniform
    draws = [Sampler(seed=0, device=CPU)(flat, [p], [pos]).token_ids[0] for pos in range(50)]
    assert len(set(draws)) > 40
    again = [Sampler(seed=1, device=CPU)(flat, [p], [pos]).token_ids[0] for pos in range(50)]
    assert draws == again


def test_seeded_uniforms_are_uniform_and_distinct():
    u = seeded_uniforms(np.arange(20000, dtype=np.uint64), np.zeros(20000, dtype=np.uint64))
    v = seeded_uniforms(np.full(20000, 3, dtype=np.uint64), np.arange(20000, dtype=np.uint64))
    for x in (u, v):
        assert x.min() >= 0.0 and x.max() < 1.0 and len(np.unique(x)) == len(x)
        hist = np.histogram(x, bins=20, range=(0, 1))[0]
        assert np.all(np.abs(hist - 1000) < 4.5 * np.sqrt(1000 * 0.95))


def test_a_row_with_one_allowed_token_always_draws_it():
    """Grammar masks leave -inf everywhere but one token; a draw never lands on a masked token, even with the
    uniform at its largest."""
    logits = torch.full((3, 50), float("-inf"))
    logits[0, 17] = 0.0
    logits[1, 0] = 2.0
    logits[2, 49] = -3.0
    params = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    assert Sampler(seed=0, device=CPU)(logits, params, [0, 0, 0]).token_ids == [17, 0, 49]
    from tokenmill.model import sampler as mod

    probs = torch.softmax(logits, dim=-1)
    top = torch.full((3,), 1.0 - 2.0**-53, dtype=torch.float64)
    assert mod._inverse_cdf(probs, top).tolist() == [17, 0, 49]
    assert mod._inverse_cdf(probs, torch.zeros(3, dtype=torch.float64)).tolist() == [17, 0, 49]


def test_logprobs_are_the_rows_log_softmax():
    torch.manual_seed(6)
    logits = torch.randn(3, 300)
    params = [SamplingParams(temperature=0.0, logprobs=0), SamplingParams(temperature=1.0, seed=1, logprobs=3),
              SamplingParams(temperature=0.0)]
    out = Sampler(seed=0, device=CPU)(logits, params, [0, 0, 0])
    lp = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    assert out.logprobs[0] == {out.token_ids[0]: lp[0, out.token_ids[0]].item()}
    top3 = lp[1].topk(3)
    want = {out.token_ids[1]: lp[1, out.token_ids[1]].item(), **dict(zip(top3.indices.tolist(), top3.values.tolist()))}
    assert out.logprobs[1] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_through_the_kernel_familys_reduction_equal_log_softmax(dtype):
    """With ``ops.token_logprobs`` (the engine's sampler: C++ on CPU) the same tokens and top-K ids as torch's
    log_softmax path, values within float32 rounding; bfloat16 logits as the head leaves them."""
    from tokenmill.kernels import cpu_kernel
    from tokenmill.ops.cpu_ops import CpuOps

    torch.manual_seed(7)
    logits = (torch.randn(4, 3001) * 3).to(dtype)
    params = [SamplingParams(temperature=0.0, logprobs=5), SamplingParams(temperature=1.0, seed=2, logprobs=0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=9, logprobs=2)]
    fast = Sampler(seed=0, device=CPU, token_logprobs=CpuOps(cpu_kernel.load()).token_logprobs)(logits, params, [3] * 4)
    ref = Sampler(seed=0, device=CPU)(logits, params, [3] * 4)
    assert fast.token_ids == ref.token_ids and fast.logprobs[2] is None
    for a, b in zip(fast.logprobs, ref.logprobs):
        if b is not None:
            assert list(a) == list(b)
            assert all(abs(a[t] - b[t]) < 1e-5 for t in b)


@pytest.mark.parametrize("family", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_rows_top_1_is_their_own_token(family, dtype):
    """Greedy rows asking for logprobs=1 (lm-eval's and most clients' form) take their argmax and its logprob as the
    top alternative instead of a topk over the row: the same entries as torch's log_softmax path."""
    from tokenmill.ops.torch_ops import TorchOps

    if family == "cpu":
        from tokenmill.kernels import cpu_kernel
        from tokenmill.ops.cpu_ops import CpuOps

        reduction = CpuOps(cpu_kernel.load()).token_logprobs
    else:
        reduction = TorchOps(CPU).token_logprobs
    torch.manual_seed(9)
    logits = (torch.randn(6, 2001) * 4).to(dtype)
    params = [SamplingParams(temperature=0.0, logprobs=[1, 0][i % 2]) for i in range(6)]
    fast = Sampler(seed=0, device=CPU, token_logprobs=reduction)(logits, params, [1] * 6)
    ref = Sampler(seed=0, device=CPU)(logits, params, [1] * 6)
    assert fast.token_ids == ref.token_ids == logits.float().argmax(dim=-1).tolist()
    for a, b in zip(fast.logprobs, ref.logprobs):
        assert list(a) == list(b) and all(abs(a[t] - b[t]) < 1e-5 for t in b)


def test_drawing_from_the_top_candidates_equals_the_full_sort():
    """The CPU's shortcut (the best 16 tokens first, the rest only where they do not hold the filtered set) draws
    the very token the full sort draws, row by row, for the same seeds."""
    torch.manual_seed(8)
    logits = torch.randn(300, 500) * torch.linspace(0.5, 6.0, 300)[:, None]  # flat to peaked rows
    params = [SamplingParams(temperature=1.0, top_p=[0.5, 0.9, 1.0][i % 3], top_k=[0, 10, 40, 0][i % 4], seed=i)
              for i in range(300)]
    short = Sampler(seed=0, device=CPU, top_candidates=16)(logits, params, [2] * 300).token_ids
    full = Sampler(seed=0, device=CPU, top_candidates=0)(logits, params, [2] * 300).token_ids
    assert short == full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_plain_draw_is_the_inverse_cdf_draw(kernels, dtype):
    """sample_rows (CpuOps.sample_plain on a CPU) on rows of a 49k vocabulary at several temperatures: each token is
    the one the exact (float64) CDF of softmax(x / T) gives for its uniform, up to 1e-6 of mass either side of a
    boundary; masked tokens (-inf: a grammar's mask) are never drawn, even with u = 0 or u next to 1 and masks at
    either end of the row; a row with one unmasked token always draws it; a row alone draws what it draws in a batch.
    Both builds (native and portable)."""
    g = torch.Generator().manual_seed(21)
    rows, vocab = 48, 49152
    x = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    x[::3, :5000] = float("-inf")  # masks at the start, at the end, and scattered
    x[1::3, -7000:] = float("-inf")
    x[2::3][torch.rand(16, vocab, generator=g) < 0.5] = float("-inf")
    x[5] = float("-inf")
    x[5, 777] = 1.0
    temperature = torch.tensor([0.3, 0.7, 1.0, 1.5] * (rows // 4), dtype=torch.float32)
    u = torch.rand(rows, dtype=torch.float64, generator=g)
    u[:3] = 0.0
    u[3:6] = 1.0 - 2.0**-53
    tokens = kernels.sample_rows(x, temperature, u)
    scaled = x.float() / temperature[:, None]
    cdf = torch.softmax(scaled.double(), dim=-1).cumsum(dim=-1)
    for r in range(rows):
        j = tokens[r].item()
        assert x[r, j] != float("-inf"), (r, j)
        below = cdf[r, j - 1].item() if j else 0.0
        assert below - 1e-6 <= u[r].item() < cdf[r, j].item() + 1e-6, (r, j, u[r].item(), below, cdf[r, j].item())
    assert tokens[5].item() == 777
    alone = kernels.sample_rows(x[7:8].contiguous(), temperature[7:8].contiguous(), u[7:8].contiguous())
    assert alone.item() == tokens[7].item()
    from tokenmill.model.sampler import torch_sample_plain

    same = (torch_sample_plain(x, temperature, u) == tokens).float().mean().item()
    assert same >= 0.95  # the torch draw: the same tokens but for uniforms within rounding of a boundary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_filtered_draw_keeps_to_the_filtered_set(kernels, dtype):
    """sample_rows_filtered (CpuOps.sample_filtered) on rows of a 49k vocabulary, broad and peaked, with top-k, top-p
    and both: every token lies in the row's filtered set (written out plainly in float64: _filtered), masked tokens
    (-inf) are never drawn, top-k 1 and a tiny top-p draw the argmax, a top-k above the unmasked tokens keeps them
    all; and the tokens are the torch path's (the full sort) but for uniforms within rounding of a boundary
    (float32), the float32 widening's (bfloat16). Both builds (native and portable)."""
    from tokenmill.model.sampler import _draw_filtered

    g = torch.Generator().manual_seed(23)
    rows, vocab = 40, 49152
    x = torch.randn(rows, vocab, generator=g) * torch.tensor([1.0, 3.0, 8.0, 20.0]).repeat(rows // 4)[:, None]
    x[::5, 10000:] = float("-inf")  # masks
    x[1::5][torch.rand(8, vocab, generator=g) < 0.7] = float("-inf")
    x[2, 3:] = float("-inf")  # three tokens left, top-k 40 below
    x = x.to(dtype)
    settings = [(0, 0.9), (50, 1.0), (40, 0.8), (1, 1.0), (0, 1e-6), (0, 0.99), (1000, 0.95), (7, 0.3)]
    params = [SamplingParams(temperature=[0.5, 1.0, 1.7][r % 3], top_k=settings[r % 8][0], top_p=settings[r % 8][1])
              for r in range(rows)]
    params[2] = SamplingParams(temperature=1.0, top_k=40)
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    u = torch.rand(rows, dtype=torch.float64, generator=g)
    u[:4] = torch.tensor([0.0, 1.0 - 2.0**-53, 0.5, 1.0 - 2.0**-53], dtype=torch.float64)
    tokens = kernels.sample_rows_filtered(x, temperature, top_k, top_p, u).tolist()
    for r, p in enumerate(params):
        allowed = _filtered(x[r].float(), p)
        assert allowed[tokens[r]] > 0, (r, p, tokens[r])
        if p.top_k == 1 or p.top_p < 1e-3:
            assert tokens[r] == x[r].float().argmax().item()
    assert tokens[2] in (0, 1, 2)
    if dtype == torch.bfloat16:  # the widening is exact: the same draws as from float32 logits
        assert tokens == kernels.sample_rows_filtered(x.float(), temperature, top_k, top_p, u).tolist()
    else:  # (bfloat16 rows hold many equal logits, which torch's sort orders its own way)
        cols = torch.stack([temperature.double(), top_k.double(), top_p.double(), u])
        ref = _draw_filtered(x.float() / temperature[:, None], cols, 0).tolist()
        assert sum(a == b for a, b in zip(tokens, ref)) >= 0.95 * rows
