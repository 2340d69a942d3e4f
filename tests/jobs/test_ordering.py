"""Whole-dataset ordering and the ordered reader, in process with the real SmolLM2 tokenizer (no model): rows that
share a preamble end up adjacent however the file shuffles them, duplicates are found (greedy or same seed, never
free sampling), a dataset with nothing to share keeps input order, and ``iter_in_order`` yields every line once in
that order across several rounds, skipping done ids, with a JobFault when the file changed."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from helpers import write_jsonl
from tokenmill.jobs.errors import JobFault
from tokenmill.jobs.inputs import InputSource, InputSpec
from tokenmill.jobs.ordering import PrefixSignatures, choose_order, dataset_order, dedupe_key, iter_in_order
from tokenmill.jobs.scan import scan
from tokenmill.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def pre(cache_dir):
    from tokenmill.jobs.runner import JobContext

    return JobContext(None, {"cache_dir": cache_dir, "max_model_len": 2048}, {"max_tokens": 4, "temperature": 0}).pre


def shared_prefix_rows(seed: int = 0) -> list[dict]:
    """4 preambles x 6 questions + 6 unrelated rows + 3 exact duplicates, shuffled."""
    rng = random.Random(seed)
    words = ["alpha", "river", "stone", "cloud", "maple", "orbit", "pixel", "quartz", "sable", "tundra"]
    heads = [f"Preamble {k}: " + " ".join(rng.choice(words) for _ in range(120)) for k in range(4)]
    rows = [{"id": f"p{k}-{i}", "prompt": f"{heads[k]} Question {i}: {' '.join(rng.choice(words) for _ in range(6))}?"}
            for k in range(4) for i in range(6)]
    rows += [{"id": f"u{i}", "prompt": " ".join(rng.choice(words) for _ in range(30))} for i in range(6)]
    rows += [{**rows[i], "id": f"dup-of-{rows[i]['id']}"} for i in (0, 7, 24)]
    rng.shuffle(rows)
    return rows


def ordered(pre, tmp_path, rows):
    src = InputSource(InputSpec(str(write_jsonl(tmp_path / "in.jsonl", rows))))
    sig = PrefixSignatures()
    s = scan(src, pre, lambda n, e: pytest.fail(str(e)), sig)
    lines = np.flatnonzero(np.frombuffer(s.valid, dtype=np.uint8))
    plen = np.frombuffer(s.prompt_tokens, dtype=np.uint32)[lines]
    return src, s, dataset_order(sig, lines, plen), choose_order(sig, lines, plen, prefix_caching=True, dedupe=False)


def test_rows_sharing_a_preamble_become_adjacent_and_duplicates_are_found(pre, tmp_path):
    rows = shared_prefix_rows()
    src, s, o, chosen = ordered(pre, tmp_path, rows)
    total = int(np.frombuffer(s.prompt_tokens, dtype=np.uint32).sum())
    ids = [rows[n - 1]["id"] for n in o.lines.tolist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    for k in range(4):  # each preamble's rows (and duplicates of them) form one run
        pos = [i for i, x in enumerate(ids) if x.startswith(f"p{k}-") or x.startswith(f"dup-of-p{k}-")]
        assert pos == list(range(pos[0], pos[0] + len(pos))), (k, ids)
    for i, x in enumerate(ids):  # a duplicate sits next to its original
        if x.startswith("dup-of-"):
            assert x.removeprefix("dup-of-") in (ids[i - 1], ids[i + 1])
    assert o.duplicates == 3
    assert o.shared_tokens > 0.5 * total and chosen is not None  # worth it for the shared prefixes alone


def test_nothing_shared_keeps_input_order(pre, tmp_path):
    rng = random.Random(3)
    rows = [{"id": i, "prompt": [rng.randrange(100, 40000) for _ in range(rng.randint(5, 60))]} for i in range(40)]
    _, _, o, chosen = ordered(pre, tmp_path, rows)
    assert o.duplicates == 0 and chosen is None


def test_dedupe_key_only_for_requests_whose_copies_must_agree():
    greedy = SamplingParams(max_tokens=4, temperature=0.0, seed=1, top_k=5)
    assert dedupe_key([1, 2], greedy) == dedupe_key([1, 2], SamplingParams(max_tokens=4, temperature=0.0))
    assert dedupe_key([1, 2], greedy) != dedupe_key([1, 3], greedy)
    assert dedupe_key([1, 2], greedy) != dedupe_key([1, 2], SamplingParams(max_tokens=5, temperature=0.0))
    assert dedupe_key([1, 2], SamplingParams(temperature=0.7)) is None  # free sampling: every copy differs
    seeded = SamplingParams(temperature=0.7, seed=9)
    assert dedupe_key([1, 2], seeded) == dedupe_key([1, 2], SamplingParams(temperature=0.7, seed=9))
    assert dedupe_key([1, 2], seeded) != dedupe_key([1, 2], SamplingParams(temperature=0.7, seed=10))


@pytest.mark.parametrize("round_tokens", [1, 150, 1 << 30])
def test_iter_in_order_reads_every_line_once_in_order_across_rounds(pre, tmp_path, round_tokens):
    rows = shared_prefix_rows(seed=1)
    src, s, o, _ = ordered(pre, tmp_path, rows)
    done = {json.dumps(rows[int(o.lines[5]) - 1]["id"])}
    skipped = []
    got = [item.request.line_no for item in iter_in_order(src, o.lines, s.prompt_tokens, done, pre,
                                                           on_skip=skipped.append, round_tokens=round_tokens)]
    expect = [n for n in o.lines.tolist() if n != int(o.lines[5])]
    assert got == expect and skipped == [int(o.lines[5])]


def test_iter_in_order_refuses_a_changed_input(pre, tmp_path):
    rows = shared_prefix_rows(seed=2)
    src, s, o, _ = ordered(pre, tmp_path, rows)
    path = tmp_path / "in.jsonl"
    lines = path.read_bytes().splitlines()
    lines[int(o.lines[0]) - 1] = b'{"id": "x", "prompt": ""}'  # same size class, now an invalid row
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(JobFault, match="changed while the job ran"):
        list(iter_in_order(InputSource(InputSpec(str(path))), o.lines, s.prompt_tokens, set(), pre))


def test_rows_of_different_lora_adapters_group_apart():
    """Rows sharing a long prompt head but run with different adapters share no cached block (the cache salts each
    adapter's blocks): the order groups each adapter's rows and counts sharing only within an adapter."""
    head = list(range(100, 400))
    sig = PrefixSignatures()
    sig.grow(12)
    adapters = [None, "a", "b"]
    for line in range(1, 13):
        sig.record(line, head + [1000 + line], SamplingParams(max_tokens=4, temperature=0.0,
                                                              lora=adapters[line % 3]))
    lines = np.arange(1, 13)
    o = dataset_order(sig, lines, np.full(12, len(head) + 1))
    runs = [adapters[n % 3] for n in o.lines.tolist()]
    assert sum(1 for i in range(1, 12) if runs[i] != runs[i - 1]) == 2, runs  # three runs, one per adapter
    assert o.shared_tokens == 3 * 3 * 300  # in each group the 3 rows after the first share all 300 head tokens
