"""One test per finding of issue 14 (the new-user report), through real `tokenmill` processes on SmolLM2.
Each failed before the fix; docs/RELIABILITY.md maps them."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import read_jsonl, tokenmill_cmd, write_jsonl

ROWS = [{"id": f"a{i}", "prompt": f"Write one word about the colour number {i}."} for i in range(6)]
FAST = ("--max-tokens", 3, "--temperature", 0, "--quiet")


def files_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.stem))


def test_resume_against_a_different_input_is_refused_not_silently_skipped(tmp_path, run_cli):
    out = tmp_path / "out.jsonl"
    v1 = write_jsonl(tmp_path / "big.jsonl", ROWS)
    v2 = write_jsonl(tmp_path / "big_v2.jsonl", [{**r, "prompt": r["prompt"] + " Again."} for r in ROWS])
    run_cli("run", v1, "-o", out, *FAST, check=0)
    refused = run_cli("run", v2, "-o", out, *FAST, check=2)
    msg = refused.stderr.strip()
    assert len(msg.splitlines()) == 1 and "different input" in msg and "big.jsonl" in msg and "big_v2.jsonl" in msg
    assert "--overwrite" in msg and "sha256" in msg
    # the same content under another name resumes (nothing to do), and a speed-only change is allowed with a note
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(v1.read_bytes())
    ok = run_cli("run", moved, "-o", out, "--max-tokens", 3, "--temperature", 0, "--max-num-seqs", 2, check=0)
    assert "the input moved" in ok.stderr and "max_num_seqs default -> 2" in ok.stderr
    assert "completed 6/6" in ok.stderr and len(read_jsonl(out)) == 6
    other = run_cli("run", v1, "-o", out, "--max-tokens", 3, "--temperature", 0.5, "--quiet", check=2)
    assert "different settings" in other.stderr and "sampling_defaults" in other.stderr


def test_deep_nesting_and_a_bom_in_a_real_run(tmp_path, run_cli):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n" + b"[" * 5000 + b"]" * 5000 + b"\n"
                    + json.dumps(ROWS[1]).encode() + b"\n")
    proc = run_cli("run", inp, "-o", tmp_path / "out.jsonl", *FAST, check=1)
    assert "Traceback" not in proc.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == ["a0", "a1"]  # the BOM line runs
    [err] = read_jsonl(tmp_path / "out.errors.jsonl")
    assert err["line"] == 2 and err["code"] == "invalid_json" and "nested too deeply" in err["message"]


def test_output_naming_a_directory_is_one_line_and_leaves_nothing(tmp_path, run_cli):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    d = tmp_path / "outdir"
    d.mkdir()
    for cmd in ("run", "embed"):
        proc = run_cli(cmd, inp, "-o", d, check=2)
        assert "is a directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list(d.iterdir()) == [] and files_beside(d) == ["outdir"]


def test_inputs_users_have_and_exit_codes(tmp_path, run_cli, cli_env):
    # .jsonl.gz, CSV with a column mapping, Parquet, stdin: the same rows, the same results
    ref_out = tmp_path / "ref.jsonl"
    ref_in = write_jsonl(tmp_path / "in.jsonl", ROWS)
    run_cli("run", ref_in, "-o", ref_out, *FAST, check=0)
    ref = {r["id"]: r["completion"] for r in read_jsonl(ref_out)}

    gz = tmp_path / "in.jsonl.gz"
    gz.write_bytes(gzip.compress(ref_in.read_bytes()))
    csv = tmp_path / "in.csv"
    csv.write_text("key,question\n" + "".join(f'{r["id"]},"{r["prompt"]}"\n' for r in ROWS))
    parquet = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [r["id"] for r in ROWS], "prompt": [r["prompt"] for r in ROWS]}), parquet)
    for inp, extra in ((gz, ()), (csv, ("--columns", "id=key,prompt=question")), (parquet, ())):
        out = tmp_path / f"out-{inp.name}.jsonl"
        run_cli("run", inp, "-o", out, *FAST, *extra, check=0)
        assert {r["id"]: r["completion"] for r in read_jsonl(out)} == ref, inp.name

    out = tmp_path / "stdin-out.jsonl"
    cmd = tokenmill_cmd("run", "-", "-o", out, *FAST)
    proc = subprocess.run(cmd, input=ref_in.read_bytes(), env=cli_env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {r["id"]: r["completion"] for r in read_jsonl(out)} == ref
    assert not (tmp_path / "stdin-out.stdin").exists()  # the spool goes once the job completes
    other = subprocess.run(cmd, input=b'{"id": "x", "prompt": "y"}\n', env=cli_env, capture_output=True, timeout=300)
    assert other.returncode == 2 and b"different input" in other.stderr

    dir_in = run_cli("run", tmp_path, "-o", tmp_path / "o.jsonl", check=2)
    assert "is a directory" in dir_in.stderr
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-16")
    refused = run_cli("run", utf16, "-o", tmp_path / "o.jsonl", check=2)
    assert "UTF-16" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    none_ok = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "x"}', '{"id": "y", "prompt": ""}'])
    proc = run_cli("run", none_ok, "-o", tmp_path / "bad-out.jsonl", "--quiet", check=1)  # no row succeeded: 1
    assert read_jsonl(tmp_path / "bad-out.jsonl") == []
    assert "Exit codes" in run_cli("run", "--help", check=0).stdout


def test_results_are_in_input_order_once_complete(tmp_path, run_cli):
    rows = [{"id": f"o{i}", "prompt": "Count: " + "one two three " * (12 - i), "max_tokens": 1 + (i * 7) % 9}
            for i in range(12)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("run", inp, "-o", tmp_path / "out.jsonl", "--temperature", 0, "--max-num-seqs", 3, "--quiet", check=0)
    assert [r["id"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["id"] for r in rows]


def test_openai_fields_logprobs_and_max_tokens_beyond_the_context(tmp_path, run_cli):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    def line(cid, url, **body):
        return {"custom_id": cid, "method": "POST", "url": url, "body": body}

    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    msgs = [{"role": "user", "content": "Name a fruit."}]
    rows = [
        line("lp-chat", chat, model="m", messages=msgs, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2),
        line("lp-cmpl", cmpl, model="m", prompt="The sky is", max_tokens=3, temperature=0, logprobs=3),
        line("schema", chat, model="m", messages=msgs, response_format={"type": "json_object"}, max_tokens=40,
             temperature=0),
        line("tools", chat, model="m", messages=msgs, tools=[{"type": "function", "function": {"name": "f"}}]),
        line("penalty", chat, model="m", messages=msgs, presence_penalty=0.5),
        line("zero-penalty", chat, model="m", messages=msgs, presence_penalty=0, max_tokens=2, temperature=0),
        line("huge", cmpl, model="m", prompt="x", max_tokens=100000),
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    run_cli("run", inp, "-o", tmp_path / "out.jsonl", "--quiet", check=1)
    out = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    errors = {e["custom_id"]: e for e in read_jsonl(tmp_path / "out.errors.jsonl")}
    assert set(out) == {"lp-chat", "lp-cmpl", "zero-penalty", "schema"}  # response_format is honoured (issue 16)
    assert {k: e["code"] for k, e in errors.items()} == {
        "tools": "unsupported_field", "penalty": "unsupported_field", "huge": "context_length_exceeded"}
    assert "tools" in errors["tools"]["message"] and "max_model_len" in errors["huge"]["message"]
    assert ChatCompletion.model_validate(out["schema"]["response"]["body"]).choices[0].message.content.startswith("{")

    cc = ChatCompletion.model_validate(out["lp-chat"]["response"]["body"])
    content = cc.choices[0].logprobs.content
    assert len(content) == cc.usage.completion_tokens and "".join(c.token for c in content) == cc.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.token == c.top_logprobs[0].token and c.logprob == pytest.approx(c.top_logprobs[0].logprob)  # greedy
        assert bytes(c.bytes).decode() == c.token
    tc = Completion.model_validate(out["lp-cmpl"]["response"]["body"])
    lp = tc.choices[0].logprobs
    assert "".join(lp.tokens) == tc.choices[0].text and len(lp.token_logprobs) == len(lp.tokens)
    assert all(len(t) == 3 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    # capped instead of refused when asked for
    capped = run_cli("run", write_jsonl(tmp_path / "huge.jsonl", [rows[-1]]), "-o", tmp_path / "h.jsonl", "--quiet",
                     "--context-overflow", "cap", "--max-model-len", 64, "--temperature", 0, check=0)
    assert capped.returncode == 0


def test_rejected_flags_leave_nothing_and_progress_and_messages_are_plain(tmp_path, run_cli, cli_env):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    out = tmp_path / "out.jsonl"
    # a rejected flag leaves nothing behind; a completed job leaves no lock and no empty errors file
    run_cli("run", inp, "-o", out, "--temperature", -1, check=2)
    assert files_beside(out) == []
    proc = subprocess.run(tokenmill_cmd("run", inp, "-o", out, "--max-tokens", 3, "--progress-interval", 0),
                          env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert files_beside(out) == ["out.jsonl", "out.manifest.json", "out.state.json"]
    # stderr is a pipe: plain progress lines, no carriage-return redraws
    assert "\r" not in proc.stderr and "tokenmill: 3/3 requests (100.0%)" in proc.stderr
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    proc = run_cli("run", empty, "-o", tmp_path / "e.jsonl", "--progress-interval", 0, check=0)
    assert "requests (" not in proc.stderr and "completed 0/0" in proc.stderr  # no bar for an empty job
    # our own validation messages
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"id": "s", "prompt": "x", "stop": 5}'])
    run_cli("run", bad, "-o", tmp_path / "b.jsonl", "--quiet", check=1)
    [err] = read_jsonl(tmp_path / "b.errors.jsonl")
    assert "stop must be a non-empty string or a list of them, got int 5" in err["message"]
    assert "not iterable" not in err["message"]
    # merge of a missing part: exit 2 and no output files
    merged = tmp_path / "merged.jsonl"
    proc = run_cli("merge", out, tmp_path / "missing.jsonl", "-o", merged, check=2)
    assert "missing.jsonl" in proc.stderr and not merged.exists() and files_beside(merged) == []


def test_the_model_runner_takes_a_step_with_nothing_scheduled(smollm2):
    from tokenmill import SamplingParams
    from tokenmill.core.step import SchedulerOutput

    engine = smollm2.engine
    assert engine.runner.execute(SchedulerOutput([], 0)).sampled_token_ids == {}
    engine.add_request("gone", [1, 2, 3], SamplingParams(max_tokens=2))
    engine.abort_request(["gone"])
    assert engine.step() == [] and not engine.has_unfinished_requests()


def test_kernels_load_from_the_cache_whatever_ninja_is_on_path(tmp_path, cli_env):
    """A cached build is loaded directly: a different (here: broken) ninja first on PATH plays no part."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ninja").write_text("#!/bin/sh\necho 'this ninja must not run' >&2\nexit 1\n")
    os.chmod(fake / "ninja", 0o755)
    env = {**cli_env, "PATH": f"{fake}:{cli_env['PATH']}"}
    code = ("from tokenmill.kernels.cpu_kernel import load_kernels\n"
            "k = load_kernels()\nprint(k.module is not None, k.build_seconds)\n")
    subprocess.run(tokenmill_cmd("build-kernels"), env=cli_env, check=True, capture_output=True, timeout=600)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.stdout.split() == ["True", "0.0"], proc.stderr
    assert "building" not in proc.stderr and "must not run" not in proc.stderr
    again = subprocess.run(tokenmill_cmd("build-kernels"), env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already built" in again.stderr


def test_without_a_compiler_one_warning_and_the_torch_path(tmp_path):
    """A fresh machine with no C++ compiler: the job still runs (the torch path), and says once what it costs."""
    from helpers import save_tiny_model

    save_tiny_model("llama", tmp_path / "tiny")
    venv_bin = Path(sys.executable).parent
    env = {"PATH": str(venv_bin), "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1",
           "HOME": str(tmp_path)}
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": i, "prompt": [5, 6, 7, i + 8]} for i in range(4)])
    proc = subprocess.run(tokenmill_cmd("run", inp, "-o", tmp_path / "out.jsonl", "--model", tmp_path / "tiny",
                                        "--max-tokens", 3, "--temperature", 0, "--dtype", "bfloat16"),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("C++ CPU kernels are not available") == 1, proc.stderr
    assert "no C++ compiler" in proc.stderr and "slower" in proc.stderr and "build-kernels" in proc.stderr
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 4
    proc = subprocess.run(tokenmill_cmd("build-kernels"), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "could not be built" in proc.stderr


def test_a_kernel_build_is_left_out_of_throughput_and_cost(tmp_path, cli_env):
    """The child reports a 30 s kernel build for its engine (a fresh machine's first job): the summary leaves it
    out of the wall time, tok/s and cost, and says so."""
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    args = [str(a) for a in ("run", inp, "-o", tmp_path / "out.jsonl", "--max-tokens", 2, "--gpu-hourly-rate", 3600)]
    child = ("import tokenmill.engine.llm_engine as e\ne.build_seconds_so_far = lambda: 30.0\n"
             f"from tokenmill.cli import main\nmain({args!r})\n")
    proc = subprocess.run([sys.executable, "-c", child], env=cli_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "not counted: a one-off 30.0 s build of the C++ kernels" in proc.stderr
    wall = float(proc.stderr.split("requests ok, 0 failed, in ")[1].split("(")[1].split(" s)")[0])
    cost = float(proc.stderr.split("$")[2].split(" for this run")[0])  # $1/s: the run's cost in dollars = its seconds
    assert wall < 30 and cost == pytest.approx(wall, abs=0.06)


def test_progress_is_a_bar_on_a_terminal(tmp_path, cli_env):
    import fcntl
    import pty
    import struct
    import termios

    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal 120 columns wide
    proc = subprocess.Popen(tokenmill_cmd("run", inp, "-o", tmp_path / "out.jsonl", "--max-tokens", 2), env=cli_env,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "\r" in text and "3/3 [" in text and "requests (" not in text  # tqdm's bar, not log lines
