"""Faults injected for real into `tokenmill run` processes, each with its documented outcome (docs/RELIABILITY.md):
a full disk (a small tmpfs in a private mount namespace), an exception inside an engine step, the output directory
made read-only mid-run (the job runs without CAP_DAC_OVERRIDE, so permissions bind even for root), the input deleted
mid-run, and damaged job files. Every kill or fault is timed from the job's own progress, never by a fixed delay."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import read_jsonl, tokenmill_cmd, write_jsonl

ROWS = [{"id": f"q{i}", "prompt": f"Question {i}: tell me about the number {i} and what it means"}
        for i in range(48)]
ARGS = ("--max-tokens", 40, "--temperature", 0, "--max-num-seqs", 6, "--quiet")


def completions(path: Path) -> dict[str, str]:
    rows = read_jsonl(path)
    got = {r["id"]: r["completion"] for r in rows}
    assert len(got) == len(rows), "an id appears twice"
    return got


def only_complete_records(path: Path) -> int:
    """Every complete line of a results file is a whole record (a torn last line is allowed: resume cuts it)."""
    data = path.read_bytes() if path.exists() else b""
    lines = data.split(b"\n")[:-1]
    for line in lines:
        json.loads(line)
    return len(lines)


def wait_for_results(out: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the job has made results durable (or ended)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if out.exists() and out.stat().st_size > 0:
            return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cli_env):
    d = tmp_path_factory.mktemp("faults-ref")
    inp = write_jsonl(d / "in.jsonl", ROWS)
    out = d / "out.jsonl"
    proc = subprocess.run(tokenmill_cmd("run", inp, "-o", out, *ARGS), env=cli_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return inp, completions(out)


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("tokenmill: error")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root")
def test_disk_full_stops_cleanly_and_resumes_to_an_exactly_once_output(reference, tmp_path, cli_env):
    inp, ref = reference
    disk, snap1, snap2 = tmp_path / "disk", tmp_path / "after-fault", tmp_path / "after-resume"
    for d in (disk, snap1, snap2):
        d.mkdir()
    job = " ".join(map(str, tokenmill_cmd("run", inp, "-o", disk / "out.jsonl", *ARGS)))
    script = f"""
set -u
mount -t tmpfs -o size=4m tmpfs {disk}
{job} 2> {tmp_path}/err1 &
pid=$!
until [ -s {disk}/out.jsonl ] || ! kill -0 $pid 2>/dev/null; do sleep 0.02; done
cat /dev/zero > {disk}/filler 2>/dev/null   # the disk is now full
wait $pid; echo $? > {tmp_path}/rc1
cp -a {disk}/. {snap1}/
rm {disk}/filler                              # space freed
{job} 2> {tmp_path}/err2; echo $? > {tmp_path}/rc2
cp -a {disk}/. {snap2}/
"""
    subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], env=cli_env,
                   timeout=900, check=True)
    err1 = (tmp_path / "err1").read_text()
    assert (tmp_path / "rc1").read_text().strip() == "3", err1
    assert "no space left on the device" in one_error_line(err1)
    assert only_complete_records(snap1 / "out.jsonl") < len(ROWS)
    assert (tmp_path / "rc2").read_text().strip() == "0", (tmp_path / "err2").read_text()
    assert completions(snap2 / "out.jsonl") == ref
    assert not (snap2 / "out.lock").exists()


def test_an_engine_exception_stops_cleanly_and_the_job_resumes(reference, tmp_path, cli_env):
    inp, ref = reference
    out = tmp_path / "out.jsonl"
    args = [str(a) for a in ("run", inp, "-o", out, *ARGS)]
    inject = (
        "import sys\n"
        "from tokenmill.worker.model_runner import ModelRunner\n"
        "real, calls = ModelRunner.execute, [0]\n"
        "def execute(self, out):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 80:\n"
        "        raise RuntimeError('injected fault in step 80')\n"
        "    return real(self, out)\n"
        "ModelRunner.execute = execute\n"
        "from tokenmill.cli import main\n"
        f"main({args!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", inject], env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr
    line = one_error_line(proc.stderr)
    assert "the engine failed (RuntimeError: injected fault in step 80)" in line and "resume" in line
    state = json.loads((tmp_path / "out.state.json").read_text())
    assert state["state"] == "failed" and "injected fault" in state["traceback"]
    written = only_complete_records(out)
    assert 0 < written < len(ROWS)
    assert not (tmp_path / "out.lock").exists()
    proc = subprocess.run(tokenmill_cmd(*args), env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert completions(out) == ref


def test_output_directory_made_read_only_mid_run(reference, tmp_path, cli_env):
    inp, ref = reference
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    out = outdir / "out.jsonl"
    # without CAP_DAC_OVERRIDE, root obeys the directory's permissions like any user
    cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
           *map(str, tokenmill_cmd("run", inp, "-o", out, *ARGS))]
    proc = subprocess.Popen(cmd, env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_results(out, proc)
        os.chmod(outdir, 0o555)
        _, err = proc.communicate(timeout=600)
    finally:
        os.chmod(outdir, 0o755)
    assert proc.returncode == 3, err
    assert "can no longer be written" in one_error_line(err) and "Permission denied" in err
    only_complete_records(out)  # results kept going to the open file; the fault came at a file it had to create
    proc = subprocess.run(cmd, env=cli_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert completions(out) == ref
    assert sorted(p.name for p in outdir.iterdir()) == ["out.jsonl", "out.manifest.json", "out.state.json"]


def test_input_deleted_mid_run_the_job_still_completes(reference, tmp_path, cli_env):
    _, ref = reference
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(tokenmill_cmd("run", inp, "-o", out, *ARGS), env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_results(out, proc)
    assert proc.poll() is None, "the job ended before the input could be deleted"
    inp.unlink()  # the job holds the file open: both its passes read the bytes it validated
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert completions(out) == ref


def test_input_truncated_mid_run_is_a_fault_not_a_silent_loss(reference, tmp_path, cli_env):
    """Truncating the file in place (not replacing it) changes what the held-open file reads: detected, exit 3.
    The child reads its input 64 bytes and 8 lines at a time, so pass 2 is still reading when the file shrinks (in
    input order: the grouped order reads each round whole before running it; tests/jobs/test_ordering.py)."""
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS + [{"id": f"x{i}", "prompt": "more"} for i in range(200)])
    out = tmp_path / "out.jsonl"
    args = [str(a) for a in ("run", inp, "-o", out, *ARGS, "--dataset-order", "input")]
    child = ("from tokenmill.jobs import inputs, scan\ninputs.BLOCK = 64\nscan.iter_line_chunks.__defaults__ = (8,)\n"
             f"from tokenmill.cli import main\nmain({args!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", child], env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_results(out, proc)
    with open(inp, "r+b") as f:
        f.truncate(100)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err
    assert "changed in place" in one_error_line(err) or "was changed while the job ran" in err
    assert only_complete_records(out) < len(ROWS) + 200


def test_damaged_job_files_are_repaired_where_safe_and_refused_otherwise(tmp_path, run_cli):
    inp = write_jsonl(tmp_path / "in.jsonl", ROWS[:4])
    out = tmp_path / "out.jsonl"
    run_cli("run", inp, "-o", out, "--max-tokens", 2, "--quiet", check=0)
    state, manifest, errors = (tmp_path / f"out.{s}" for s in ("state.json", "manifest.json", "errors.jsonl"))

    state.write_text('{"state": "runn')  # torn state file: status says so; the next run rewrites it
    st = run_cli("status", out, check=2)
    assert "damaged" in st.stderr and len(st.stderr.strip().splitlines()) == 1
    run_cli("run", inp, "-o", out, "--max-tokens", 2, "--quiet", check=0)
    assert json.loads(state.read_text())["state"] == "completed"

    errors.write_text('{"line": 9, "id": null, "code": "invalid_json", "message": "line 9 x"}\n{"line": 1')  # torn tail
    run_cli("run", inp, "-o", out, "--max-tokens", 2, "--quiet", check=1)
    assert [e["line"] for e in read_jsonl(errors)] == [9]
    errors.unlink()

    good = out.read_bytes()
    lines = good.split(b"\n")
    out.write_bytes(b"\n".join([lines[0], b"garbage in the middle", *lines[1:]]))
    refused = run_cli("run", inp, "-o", out, "--max-tokens", 2, "--quiet", check=2)
    assert "out.jsonl line 2 is not a valid record" in refused.stderr and "--overwrite" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    out.write_bytes(good)

    manifest.write_text("{not json")
    refused = run_cli("run", inp, "-o", out, "--max-tokens", 2, "--quiet", check=2)
    assert "manifest.json is damaged" in refused.stderr and "--overwrite" in refused.stderr
    run_cli("run", inp, "-o", out, "--max-tokens", 2, "--quiet", "--overwrite", check=0)
    assert len(read_jsonl(out)) == 4


def test_a_damaged_embed_part_is_dropped_and_its_rows_run_again(tmp_path):
    from tokenmill.embed.vectors import ParquetVectorSink, parts_dir

    out = tmp_path / "v.parquet"
    sink = ParquetVectorSink(out, 4, {"model": "m"}, part_rows=2)
    for i in range(4):
        sink.write(f"id{i}", np.full(4, i, dtype=np.float32))
    sink.flush()
    parts = sorted(parts_dir(out).glob("part-*.parquet"))
    parts[0].write_bytes(parts[0].read_bytes()[:20])  # damaged outside tokenmill
    again = ParquetVectorSink(out, 4, {"model": "m"})
    assert again.done_ids() == {"id2", "id3"} and again.dropped == 1  # id0, id1 run again


def test_sigint_reports_the_requests_actually_running(reference, tmp_path, cli_env):
    inp, _ = reference
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(tokenmill_cmd("run", inp, "-o", out, *ARGS), env=cli_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    wait_for_results(out, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    running = int(err.split(" running and ")[0].rsplit("; ", 1)[1])
    assert 1 <= running <= 6, err  # --max-num-seqs 6: never the window of queued requests
    assert not (tmp_path / "out.lock").exists()
