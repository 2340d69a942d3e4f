"""EngineLoop, the one loop every caller drives the engine with: the window, dedupe, feeds closed mid-way,
requests added straight in, and exactly-once delivery under random interleavings (a real tiny engine)."""

from __future__ import annotations

import random

import pytest

from helpers import save_tiny_model
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.loop import EngineLoop, Submission
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("loop") / "model"
    save_tiny_model("llama", path)
    return LLMEngine(EngineConfig.from_dict({"model": str(path), "max_num_seqs": 4, "num_threads": 1,
                                             "max_num_batched_tokens": 64}))


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(2, 20))] for _ in range(n)]


def alone(engine, ids: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("alone", ids, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs[0].token_ids


def test_a_feed_runs_through_a_bounded_window_and_every_row_comes_back_once(engine):
    ps = prompts(23, seed=1)
    loop = EngineLoop(engine, window=5)
    loop.open_feed("f", (Submission(str(i), p, GREEDY, payload=i) for i, p in enumerate(ps)), sort_by_length=True)
    got = {}
    while loop.busy:
        for sub, out in loop.step().finished:
            assert sub.payload not in got and out.request_id == sub.request_id == str(sub.payload)
            got[sub.payload] = out.token_ids
        assert loop.num_held <= 5
    assert not loop.feeds and sorted(got) == list(range(23))
    for i in (0, 7, 22):
        assert got[i] == alone(engine, ps[i], GREEDY)


def test_identical_rows_of_a_feed_are_computed_once_and_others_are_not(engine):
    base = prompts(4, seed=2)
    seeded = SamplingParams(max_tokens=6, temperature=0.8, seed=7, ignore_eos=True)
    free = SamplingParams(max_tokens=6, temperature=0.8, ignore_eos=True)
    rows = [(base[0], GREEDY), (base[1], GREEDY), (base[0], GREEDY), (base[2], seeded), (base[0], GREEDY),
            (base[2], seeded), (base[3], free), (base[3], free),
            (base[1], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))]  # other sampling: no twin
    gen0 = engine.num_generated_tokens
    loop = EngineLoop(engine)
    loop.open_feed("f", (Submission(str(i), p, sp, payload=i) for i, (p, sp) in enumerate(rows)))
    got = {sub.payload: (out.request_id, out.token_ids, bool(sub.follows)) for sub, out in loop.run()}
    assert sorted(got) == list(range(len(rows)))
    assert all(got[i][0] == str(i) for i in got)  # each under its own id
    assert got[2][1] == got[4][1] == got[0][1] and got[5][1] == got[3][1]
    assert [i for i in got if got[i][2]] == [2, 4, 5] and loop.num_deduplicated == 3
    assert engine.num_generated_tokens - gen0 == 5 * 6 + 5  # six requests computed, three rows followed
    # with dedupe off every row is computed
    gen0 = engine.num_generated_tokens
    loop = EngineLoop(engine)
    loop.open_feed("g", (Submission(str(i), p, sp) for i, (p, sp) in enumerate(rows)), dedupe=False)
    assert len(list(loop.run())) == len(rows) and engine.num_generated_tokens - gen0 == 8 * 6 + 5


def test_feeds_share_the_window_dedupe_within_a_feed_and_one_closes_without_touching_the_other(engine):
    ps = prompts(12, seed=3)
    loop = EngineLoop(engine, window=6)
    loop.open_feed("a", (Submission(str(i), ps[i % 6], GREEDY, payload=("a", i)) for i in range(12)))
    loop.open_feed("b", (Submission(str(i), ps[i], GREEDY, payload=("b", i)) for i in range(12)))
    loop.open_feed("c", (Submission(str(i), ps[i], GREEDY, payload=("c", i)) for i in range(6)))
    done = []
    while not loop.feeds["b"].in_engine:  # b is admitted once a is read to its end, into the room a leaves
        assert not any(sub.feed == "b" for sub, _ in done)
        done += loop.step().finished
    assert loop.feeds["a"].exhausted and not loop.feeds["c"].in_engine
    running = len(loop.feeds["b"].in_engine)
    assert loop.close_feed("b") == (running, 0)
    assert loop.close_feed("b") == (0, 0)
    while loop.busy:
        done += loop.step().finished
    feeds = [sub.payload[0] for sub, _ in done]
    assert feeds.count("a") == 12 and feeds.count("c") == 6
    assert 0 <= feeds.count("b") < 12 and not engine.has_unfinished_requests()
    outs = {sub.payload: out.token_ids for sub, out in done}
    assert all(outs["a", i] == outs["c", i % 6] for i in range(12))  # a's twins and c's rows agree
    # "a" repeats each prompt twice, but its rows were admitted in one window only partly: at most 6 followed
    assert loop.num_deduplicated <= 6


def test_requests_added_straight_in_and_aborted(engine):
    ps = prompts(3, seed=4)
    loop = EngineLoop(engine, window=1)  # add() ignores the window
    for i, p in enumerate(ps):
        loop.add(Submission(f"r{i}", p, GREEDY, payload=i))
    assert engine.num_unfinished_requests == 3
    loop.abort(["r1", "nope"])
    got = [sub.payload for sub, _ in loop.run()]
    assert sorted(got) == [0, 2] and not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="already open"):
        loop.open_feed("x", [])
        loop.open_feed("x", [])


@pytest.mark.parametrize("seed", range(4))
def test_every_submission_ends_exactly_once_under_random_closes(engine, seed):
    """Random feeds (with duplicates), windows and feed closes between steps: each submission of a feed still open
    at its end comes back exactly once with the tokens it computes alone; a closed feed's rows never come back
    after the close, and the engine ends empty."""
    rng = random.Random(seed)
    pool = prompts(5, seed=10 + seed)
    loop = EngineLoop(engine, window=rng.randint(2, 9))
    rows, closed, seen = {}, set(), {}
    for f in range(rng.randint(2, 4)):
        name = f"f{f}"
        rows[name] = items = [(pool[rng.randrange(5)]) for _ in range(rng.randint(0, 10))]
        loop.open_feed(name, [Submission(str(i), p, GREEDY, payload=(name, i)) for i, p in enumerate(items)])
    while loop.busy:
        if rng.random() < 0.15 and loop.feeds:
            name = rng.choice(sorted(loop.feeds))
            loop.close_feed(name)
            closed.add(name)
        for sub, out in loop.step().finished:
            assert sub.payload not in seen and sub.feed not in closed
            seen[sub.payload] = out.token_ids
    assert not engine.has_unfinished_requests() and loop.num_followers == 0
    expect = {(f, i) for f, items in rows.items() if f not in closed for i in range(len(items))}
    assert expect <= set(seen)
    reference = {tuple(p): alone(engine, p, GREEDY) for p in pool}
    for (f, i), tokens in seen.items():
        assert tokens == reference[tuple(rows[f][i])]
