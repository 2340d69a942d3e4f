"""`tokenmill run` end to end on the real embedded model, in real subprocesses: bad rows, OpenAI round trip,
SIGKILL and resume, SIGTERM, the lock, the manifest, partitions and merge, status during a run, CLI errors."""

import json
import random
import signal
import subprocess
import time

import pytest

from helpers import read_jsonl, tokenmill_cmd, write_jsonl

TOPICS = ["the sea", "a robot", "autumn leaves", "coffee", "a lighthouse", "mountains", "a library", "trains",
          "the moon", "a garden", "snow", "a violin"]


def dataset(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(0, 25)))
        if i % 3 == 0:
            rows.append({"id": f"r{i}", "messages": [{"role": "user", "content": f"Write about {topic}. {words}"}]})
        elif i % 3 == 1:
            rows.append({"id": i, "prompt": f"A short story about {topic}: {words}"})
        else:  # seeded sampling must also be reproducible across restarts
            rows.append({"id": f"s{i}", "prompt": f"Facts about {topic}:", "temperature": 0.8, "seed": i})
    return rows


def by_id(records):
    return {json.dumps(r.get("custom_id", r.get("id"))): r for r in records}


# Six requests at a time: results then stream out a few rows at a time over 6 waves, so a kill or a signal timed
# from the job's own progress lands mid-job however fast the machine is.
FEW_AT_A_TIME = ("--max-num-seqs", 6)


def complete_lines(path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env):
    """An uninterrupted run of the 36-row dataset (greedy by default, some rows seeded)."""
    d = tmp_path_factory.mktemp("reference")
    inp = write_jsonl(d / "in.jsonl", dataset(36))
    out = d / "out.jsonl"
    proc = subprocess.run(tokenmill_cmd("run", inp, "-o", out, "--max-tokens", 20, "--temperature", 0, *FEW_AT_A_TIME),
                          env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "completed 36/36 requests ok, 0 failed" in proc.stderr
    return inp, by_id(read_jsonl(out)), proc.stderr


def test_uninterrupted_run_writes_every_row_once(reference):
    inp, ref, stderr = reference
    assert len(ref) == 36
    assert all(r["finish_reason"] in ("stop", "length") and r["output_tokens"] <= 20 for r in ref.values())
    assert "tok/s" in stderr and "preemptions" in stderr


def test_sigkill_at_random_points_then_resume_gives_the_same_results(reference, tmp_path, cli_env):
    inp, ref, _ = reference
    out = tmp_path / "out.jsonl"
    cmd = tokenmill_cmd("run", inp, "-o", out, "--max-tokens", 20, "--temperature", 0, "--quiet", *FEW_AT_A_TIME)
    rng = random.Random(42)
    kills = 0
    for _ in range(3):
        before = complete_lines(out)
        proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and complete_lines(out) <= before and time.monotonic() < deadline:
            time.sleep(0.02)  # until this run has written a result of its own
        time.sleep(rng.uniform(0.0, 0.3))  # then kill at a random point
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        if out.exists():  # a kill may land mid-line: leave a torn tail behind on purpose once
            with open(out, "ab") as f:
                f.write(b'{"id": "torn')
    assert kills >= 2, "the job finished before it could be killed: make the dataset bigger"
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = read_jsonl(out)
    got = by_id(rows)
    assert len(rows) == len(got) == 36, "every id exactly once"
    for key, rec in ref.items():
        assert got[key]["completion"] == rec["completion"], key
    assert json.loads((tmp_path / "out.state.json").read_text())["state"] == "completed"


def test_sigterm_stops_cleanly_and_resume_finishes(reference, tmp_path, cli_env):
    inp, ref, _ = reference
    out = tmp_path / "out.jsonl"
    # longer outputs than the reference, so the job is surely still running when the signal comes
    cmd = tokenmill_cmd("run", inp, "-o", out, "--max-tokens", 40, "--temperature", 0, "--quiet", *FEW_AT_A_TIME)
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "out.state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (state.exists() and json.loads(state.read_text()).get("done", 0) > 0):
        time.sleep(0.2)
    assert json.loads(state.read_text())["state"] == "running"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Run the same command again to resume" in err and "Traceback" not in err
    status = subprocess.run(tokenmill_cmd("status", out), env=cli_env, capture_output=True, text=True)
    assert "state:        interrupted" in status.stdout
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert by_id(read_jsonl(out)).keys() == ref.keys() and len(read_jsonl(out)) == 36


def test_status_while_running_and_lock_against_a_second_run(reference, tmp_path, cli_env, run_cli):
    inp, _, _ = reference
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(tokenmill_cmd("run", inp, "-o", out, "--max-tokens", 20, "--quiet", *FEW_AT_A_TIME),
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen_running = None
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            st = run_cli("status", out)
            if st.returncode == 0 and "state:        running" in st.stdout and "/ 36 done" in st.stdout:
                seen_running = st.stdout
                break
            time.sleep(0.3)
        assert seen_running, "never saw the job running"
        assert "generation tok/s" in seen_running and "ETA" in seen_running
        second = run_cli("run", inp, "-o", out, "--max-tokens", 20)
        assert second.returncode == 2
        assert "another tokenmill run" in second.stderr and "Traceback" not in second.stderr
    finally:
        assert proc.wait(timeout=600) == 0
    done = run_cli("status", out, check=0)
    assert "state:        completed" in done.stdout and "36 / 36 done (100.0%)" in done.stdout


def test_resume_with_other_settings_is_refused_unless_overwrite(tmp_path, run_cli):
    inp = write_jsonl(tmp_path / "in.jsonl", dataset(4))
    out = tmp_path / "out.jsonl"
    run_cli("run", inp, "-o", out, "--max-tokens", 4, "--quiet", check=0)
    refused = run_cli("run", inp, "-o", out, "--max-tokens", 5, "--quiet", check=2)
    assert "different settings" in refused.stderr and "--overwrite" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    run_cli("run", inp, "-o", out, "--max-tokens", 5, "--quiet", "--overwrite", check=0)
    assert all(r["output_tokens"] <= 5 for r in read_jsonl(out)) and len(read_jsonl(out)) == 4


BAD_CORPUS = [
    '{"id": "ok1", "prompt": "Hello", "max_tokens": 3}',
    "{not json",
    "[1, 2, 3]",
    '{"prompt": "no id"}',
    '{"id": {"a": 1}, "prompt": "object id"}',
    '{"id": "ok1", "prompt": "duplicate"}',
    '{"id": "n1"}',
    '{"id": "m1", "messages": [{"role": "user"}]}',
    '{"id": "e1", "prompt": ""}',
    '{"id": "long", "prompt": "' + "word " * 300 + '"}',
    '{"id": "t1", "prompt": "x", "temperature": 7000}',
    '{"custom_id": "u1", "method": "POST", "url": "/v1/images", "body": {}}',
    '{"custom_id": "n2", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "n": 300}}',
    "",
    '{"id": "ok2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}',
]
EXPECTED_CODES = {2: "invalid_json", 3: "not_an_object", 4: "invalid_id", 5: "invalid_id", 6: "duplicate_id",
                  7: "missing_input", 8: "invalid_messages", 9: "empty_prompt", 10: "prompt_too_long",
                  11: "invalid_sampling", 12: "unsupported_url", 13: "invalid_sampling", 16: "invalid_utf8"}


def test_bad_input_corpus_becomes_error_records_and_the_job_goes_on(tmp_path, run_cli):
    inp = tmp_path / "bad.jsonl"
    with open(inp, "wb") as f:
        f.write("\n".join(BAD_CORPUS).encode() + b"\n")
        f.write(b'{"id": "bytes", "prompt": "caf\xe9"}\n')  # line 16: Latin-1, not UTF-8
    out = tmp_path / "out.jsonl"
    proc = run_cli("run", inp, "-o", out, "--max-model-len", 256, check=1)  # 1: some rows failed
    assert "completed 2/2 requests ok, 13 failed" in proc.stderr and "out.errors.jsonl" in proc.stderr
    assert sorted(r["id"] for r in read_jsonl(out)) == ["ok1", "ok2"]
    errors = read_jsonl(tmp_path / "out.errors.jsonl")
    assert {e["line"]: e["code"] for e in errors} == EXPECTED_CODES
    assert all(e["message"].startswith(f"line {e['line']}") for e in errors)
    assert {e["line"]: e["id"] for e in errors}[6] == "ok1"
    # validate agrees, and exits 1
    val = run_cli("validate", inp, "--max-model-len", 256, check=1)
    assert {json.loads(line)["line"] for line in val.stdout.splitlines()} == set(EXPECTED_CODES)
    # resuming writes nothing twice
    run_cli("run", inp, "-o", out, "--max-model-len", 256, check=1)
    assert len(read_jsonl(tmp_path / "out.errors.jsonl")) == len(EXPECTED_CODES) and len(read_jsonl(out)) == 2


def test_openai_batch_round_trip_validates_against_openai_types(tmp_path, run_cli):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    rows = [
        {"custom_id": "chat-1", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-x", "messages": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Name a color."}],
                  "max_completion_tokens": 8, "temperature": 0}},
        {"custom_id": "cmpl-1", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gpt-x", "prompt": "The sky is", "max_tokens": 6, "temperature": 0, "stop": ["\n"]}},
    ]
    inp = write_jsonl(tmp_path / "batch.jsonl", rows)
    out = tmp_path / "out.jsonl"
    run_cli("run", inp, "-o", out, "--quiet", check=0)
    recs = {r["custom_id"]: r for r in read_jsonl(out)}
    chat, cmpl = recs["chat-1"], recs["cmpl-1"]
    for rec in (chat, cmpl):
        assert rec["error"] is None and rec["response"]["status_code"] == 200 and rec["id"].startswith("batch_req_")
    cc = ChatCompletion.model_validate(chat["response"]["body"])
    assert cc.choices[0].message.role == "assistant" and cc.usage.completion_tokens <= 8
    assert cc.usage.total_tokens == cc.usage.prompt_tokens + cc.usage.completion_tokens
    tc = Completion.model_validate(cmpl["response"]["body"])
    assert tc.object == "text_completion" and "\n" not in tc.choices[0].text and tc.usage.completion_tokens <= 6


def test_three_partitions_merge_into_the_unpartitioned_result(reference, tmp_path, run_cli):
    inp, ref, _ = reference
    bad = tmp_path / "in.jsonl"  # the reference input plus two bad lines, to check errors are partitioned too
    bad.write_text(inp.read_text() + "{oops\n" + '{"id": "r0", "prompt": "dup"}\n')
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}.jsonl"
        run_cli("run", bad, "-o", part, "--max-tokens", 20, "--temperature", 0, "--quiet", "--partition", i,
                "--total-partitions", 3, check=1 if i < 2 else 0)  # bad lines 37 and 38 fall to partitions 0 and 1
        parts.append(part)
    sizes = [len(read_jsonl(p)) for p in parts]
    assert sum(sizes) == 36 and max(sizes) - min(sizes) <= 1
    merged = tmp_path / "merged.jsonl"
    run_cli("merge", *parts, "-o", merged, "--input", bad, check=0)
    rows = read_jsonl(merged)
    assert [json.dumps(r["id"]) for r in rows] == list(ref.keys())  # input order
    assert {k: r["completion"] for k, r in by_id(rows).items()} == {k: r["completion"] for k, r in ref.items()}
    assert [e["line"] for e in read_jsonl(tmp_path / "merged.errors.jsonl")] == [37, 38]
    # a missing part is detected
    missing = run_cli("merge", parts[0], parts[1], "-o", tmp_path / "m2.jsonl", "--input", bad, check=1)
    assert "neither a result nor an error" in missing.stderr


def test_plan_reports_the_memory_plan(reference, run_cli):
    inp, _, _ = reference
    proc = run_cli("plan", inp, "--max-tokens", 64, check=0)
    for field in ("prompt tokens:", "p95", "KV bytes per block:", "KV blocks available:", "max concurrent sequences:",
                  "safe concurrency:", "max_num_seqs=", "max_num_batched_tokens="):
        assert field in proc.stdout
    # SmolLM2: 30 layers x 3 KV heads x 64 dims x 2 (K and V) x 4 bytes x 16 tokens
    assert f"{30 * 3 * 64 * 2 * 4 * 16:,}" in proc.stdout


def test_config_file_and_cli_errors_are_one_line_exit_2(tmp_path, run_cli):
    inp = write_jsonl(tmp_path / "in.jsonl", dataset(2))
    cfg = tmp_path / "batch.yaml"
    cfg.write_text("scheduler:\n  max_num_seqs: 2\n  preemption_mode: recompute\nsampling:\n  max_tokens: 3\n"
                   "  temperature: 0\n")
    run_cli("run", inp, "-o", tmp_path / "out.jsonl", "--config", cfg, "--quiet", check=0)
    assert all(r["output_tokens"] <= 3 for r in read_jsonl(tmp_path / "out.jsonl"))
    manifest = json.loads((tmp_path / "out.manifest.json").read_text())
    assert manifest["speed"] == {"max_num_seqs": 2, "preemption_mode": "recompute"}
    assert manifest["settings"]["sampling_defaults"] == {"max_tokens": 3, "temperature": 0}

    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text("scheduler:\n  max_num_seq: 2\n")
    cases = [
        (("run", tmp_path / "missing.jsonl", "-o", tmp_path / "o.jsonl"), "does not exist"),
        (("run", inp, "-o", tmp_path / "no" / "dir" / "o.jsonl"), "output directory"),
        (("run", inp, "-o", tmp_path / "o.jsonl", "--model", tmp_path / "nomodel"), "does not exist"),
        (("run", inp, "-o", tmp_path / "o.jsonl", "--config", bad_cfg), "scheduler.max_num_seq"),
        (("run", inp, "-o", tmp_path / "o.jsonl", "--max-num-seqz", 3), "No such option"),
        (("run", inp, "-o", tmp_path / "o.jsonl", "--temperature", -1), "temperature"),
        (("status", tmp_path / "never.jsonl"), "no job state"),
    ]
    for args, needle in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (args, proc.stderr)


def test_help_describes_every_command(run_cli):
    top = run_cli("--help", check=0).stdout
    for cmd in ("run", "status", "plan", "validate", "merge", "eval"):
        assert cmd in top
        assert "--help" in run_cli(cmd, "--help", check=0).stdout
    assert "--gpu-hourly-rate" in run_cli("run", "--help", check=0).stdout


def test_cost_summary(tmp_path, run_cli):
    inp = write_jsonl(tmp_path / "in.jsonl", dataset(3))
    proc = run_cli("run", inp, "-o", tmp_path / "o.jsonl", "--max-tokens", 4, "--gpu-hourly-rate", 2.5,
                   "--num-gpus", 2, check=0)
    assert "per million output tokens" in proc.stderr and "(2 x $2.50/h)" in proc.stderr


def test_status_checks_the_pid_only_on_the_machine_that_wrote_the_state(tmp_path):
    import socket

    from tokenmill.jobs.state import read_status

    dead = subprocess.Popen(["true"])
    dead.wait()
    path = tmp_path / "s.state.json"
    for host, expected in [(socket.gethostname(), "interrupted"), ("another-node", "running"), (None, "interrupted")]:
        path.write_text(json.dumps({"state": "running", "pid": dead.pid, **({"host": host} if host else {})}))
        assert read_status(path)["state"] == expected, host


def test_prefix_caching_in_a_job_changes_nothing_but_the_work(tmp_path, run_cli):
    """Chat rows share the template's system prompt and a long common instruction: --prefix-caching gives the same
    results as --no-prefix-caching, and the summary and status report the hit rate."""
    head = "Answer in one short sentence, as a careful assistant who checks every fact twice before writing. " * 3
    rows = [{"id": i, "messages": [{"role": "user", "content": f"{head} Question {i}: name a colour."}],
             "max_tokens": 8, "temperature": 0} for i in range(24)]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    outs = {}
    for flag in ("--prefix-caching", "--no-prefix-caching"):
        out = tmp_path / f"out{flag}.jsonl"
        p = run_cli("run", src, "-o", out, flag, "--max-num-seqs", 4, check=0)
        outs[flag] = read_jsonl(out)
        if flag == "--prefix-caching":
            assert "prefix cache:" in p.stderr and "(0.0%)" not in p.stderr, p.stderr
            assert "prefix cache:" in run_cli("status", out, check=0).stdout
        else:
            assert "prefix cache:" not in p.stderr
    assert outs["--prefix-caching"] == outs["--no-prefix-caching"]


def grouped_dataset() -> tuple[list[dict], list[dict]]:
    """(unique rows, the same plus copies under new ids), shuffled: 3 long preambles x 5 greedy questions, and copies
    of 4 greedy rows and of 2 seeded rows (computed once each) and of 2 freely sampled rows (computed every time)."""
    rng = random.Random(5)
    heads = [f"Instructions set {k}. " + " ".join(rng.choice(TOPICS) for _ in range(60)) for k in range(3)]
    rows = [{"id": f"p{k}-{i}", "prompt": f"{heads[k]} Question {i}: what is {rng.choice(TOPICS)}?", "max_tokens": 8,
             "temperature": 0} for k in range(3) for i in range(5)]
    rows += [{"id": f"seeded{i}", "prompt": f"Facts about {TOPICS[i]}:", "max_tokens": 8, "temperature": 0.9,
              "seed": 100 + i} for i in range(2)]
    rows += [{"id": f"free{i}", "prompt": f"Ideas about {TOPICS[i]}:", "max_tokens": 8, "temperature": 0.9}
             for i in range(2)]
    copies = [{**rows[i], "id": f"copy-{rows[i]['id']}"} for i in (0, 6, 12, 13, 15, 16, 17, 18)]
    both = rows + copies
    rng.shuffle(rows)
    rng.shuffle(both)
    return rows, both


def test_dataset_order_and_dedupe_change_nothing_but_the_work_and_resume(tmp_path, cli_env, run_cli):
    """Rows sharing preambles are grouped, identical requests (greedy or same seed) computed once: results equal a
    run of the unique rows with neither caching nor grouping, a copy's result is its original's, freely sampled
    copies are computed apart; interrupted by SIGTERM and resumed, every id is written once with the same results."""
    unique, both = grouped_dataset()
    plain = run_cli("run", write_jsonl(tmp_path / "unique.jsonl", unique), "-o", tmp_path / "unique.out.jsonl",
                    "--no-prefix-caching", "--max-num-seqs", 4, check=0)
    assert "dataset order" not in plain.stderr and "deduplicated" not in plain.stderr
    ref = {r["id"]: r for r in read_jsonl(tmp_path / "unique.out.jsonl")}
    src = write_jsonl(tmp_path / "in.jsonl", both)
    out = tmp_path / "out.jsonl"
    p = run_cli("run", src, "-o", out, "--max-num-seqs", 4, check=0)
    assert "dataset order: rows grouped by shared prefix" in p.stderr, p.stderr
    assert "deduplicated: 6 rows" in p.stderr, p.stderr  # the freely sampled copies are not among them
    assert "deduplicated: 6 rows" in run_cli("status", out, check=0).stdout
    got = {r["id"]: r for r in read_jsonl(out)}
    assert [r["id"] for r in read_jsonl(out)] == [r["id"] for r in both], "input order"
    for rid, rec in got.items():
        if not rid.startswith("free") and not rid.startswith("copy-free"):
            assert rec["completion"] == ref[rid.removeprefix("copy-")]["completion"], rid
    # interrupted part way (timed by the job's own progress), then resumed: the same results, every id once
    out2 = tmp_path / "out2.jsonl"
    cmd = tokenmill_cmd("run", src, "-o", out2, "--max-num-seqs", 2, "--quiet")
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and complete_lines(out2) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert run_cli("run", src, "-o", out2, "--max-num-seqs", 2, check=0).returncode == 0
    rows2 = read_jsonl(out2)
    assert [r["id"] for r in rows2] == [r["id"] for r in both], "every id once, in input order"
    for r in rows2:
        if "free" not in r["id"]:
            assert r["completion"] == got[r["id"]]["completion"], r["id"]
