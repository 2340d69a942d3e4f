"""The job state file's history and elapsed time (what the live page draws), without a model: points carry the rows
and the tokens of every run, a resume continues them as a new run, thinning keeps the span, and --overwrite (the
old file removed before the first write) starts afresh."""

import json

from tokenmill.jobs.state import HISTORY_POINTS, StateFile


def snapshot(done: int, prompt: int, gen: int, elapsed: float) -> dict:
    return {"state": "running", "done": done, "total": 100, "prompt_tokens": prompt, "gen_tokens": gen,
            "elapsed_s": elapsed}


def read(path) -> dict:
    return json.loads(path.read_text())


def test_history_carries_over_a_resume_as_a_new_run(tmp_path, monkeypatch):
    clock = iter(range(1000, 100000, 3))
    monkeypatch.setattr("tokenmill.jobs.state.time.time", lambda: float(next(clock)))
    path = tmp_path / "out.jsonl.state.json"
    first = StateFile(path)
    first.write(snapshot(0, 0, 0, 1.0), force=True)
    first.write(snapshot(10, 500, 200, 5.0), force=True)
    d = read(path)
    assert [p[1:] for p in d["history"]] == [[0, 0, 0], [10, 700, 0]] and d["elapsed_total_s"] == 5.0

    second = StateFile(path)  # a resume: counts restart at 0 in the new run
    second.write(snapshot(10, 0, 0, 0.5), force=True)
    second.write(snapshot(15, 300, 100, 2.5), force=True)
    d = read(path)
    assert [p[1:] for p in d["history"]] == [[0, 0, 0], [10, 700, 0], [10, 700, 1], [15, 1100, 1]]
    assert d["elapsed_total_s"] == 5.0 + 2.5  # both runs' time: what an hourly rate is charged for

    path.unlink()  # --overwrite removes it before the job's first write
    third = StateFile(path)
    third.write(snapshot(1, 10, 0, 1.0), force=True)
    d = read(path)
    assert [p[1:] for p in d["history"]] == [[1, 10, 0]] and d["elapsed_total_s"] == 1.0


def test_history_is_thinned_to_a_bounded_size_keeping_its_span(tmp_path, monkeypatch):
    clock = iter(range(0, 10**7, 2))
    monkeypatch.setattr("tokenmill.jobs.state.time.time", lambda: float(next(clock)))
    path = tmp_path / "out.jsonl.state.json"
    sf = StateFile(path)
    for i in range(3 * HISTORY_POINTS):
        sf.write(snapshot(i, 10 * i, 0, float(i)), force=True)
    points = read(path)["history"]
    assert len(points) < HISTORY_POINTS
    assert points[0][1] == 0 and points[-1][1] == 3 * HISTORY_POINTS - 1  # first and latest kept
    times = [p[0] for p in points]
    assert times == sorted(times) and all(p[2] == 10 * p[1] for p in points)
