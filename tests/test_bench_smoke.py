"""The benchmark harness runs end to end on a tiny model and writes well-formed results (no timing assertions)."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent


def test_harness_quick_run_writes_json_and_markdown(tmp_path):
    save_tiny_model("llama", tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--model", str(tmp_path / "model"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next((tmp_path / "out").glob("bench-*.json")).read_text())
    assert {"machine", "load_s", "workloads", "w", "scheduler", "sweep", "scale", "roofline", "embed"} <= result.keys()
    assert Path(result["sweep_plot"]).stat().st_size > 1000  # a real PNG
    assert {(r["max_num_seqs"], r["max_num_batched_tokens"]) for r in result["sweep"]} == {(1, 64), (4, 64)}
    assert [r["requests"] for r in result["scale"]] == [4, 10, 40]
    assert result["machine"]["torch"] and result["machine"]["threads"] >= 1
    engines = [r["engine"] for r in result["w"]]
    assert engines[0].startswith("tokenmill") and any(e.startswith("transformers static") for e in engines)
    assert [r["engine"] for r in result["scheduler"]] == [
        "prefill_first", "continuous, no chunked prefill", "continuous + chunked prefill"]
    for r in result["w"][:2] + result["scheduler"] + result["sweep"] + result["scale"]:
        assert r["output_tokens"] > 0 and r["wall_s"] > 0 and r["total_tok_s"] > 0
    assert result["w"][0]["output_tokens"] == result["workloads"]["W"]["output_tokens"]
    assert result["roofline"]["gemm_gflops_fp32"] > 0 and result["roofline"]["w_flops"] > 0
    emb = result["embed"]
    assert emb["rows"][0]["engine"].startswith("tokenmill") and emb["rows"][0]["padding"] == 0.0
    assert any("sentence-transformers" in r["engine"] and r["texts_s"] > 0 for r in emb["rows"])
    assert emb["min_cosine_vs_st"] >= 0.9999 and {r["kind"] for r in emb["index"]} == {"flat", "hnsw", "ivf"}
    md = next((tmp_path / "out").glob("bench-*.md")).read_text()
    assert "### w" in md and "### embed" in md


def test_gpu_bench_smoke_runs_every_section(tmp_path):
    """benchmarks/gpu_bench.py is run once on a lent GPU with no second chance: its --smoke mode (the same code at
    tiny shapes, on this CPU) must go through every section without an error."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert result["smoke"] and result["device"] == "cpu"
    for name in ("nanovllm", "llama8b_short", "llama8b_long"):
        r = result[name]
        assert "error" not in r, r
        assert r["output_tokens"] > 0 and not r["truncated_at_deadline"]
    assert result["nanovllm"]["output_tokens"] == sum(_nanovllm_output_lens())
    floor = result["decode_floor"]
    assert "error" not in floor, floor
    assert floor["batch"] == 8 and floor["median_step_ms"] > 0 and floor["floor_over_step"] > 0
    hf = result["hf"]
    assert not [r for r in hf if "error" in r], hf
    assert {r["workload"] for r in hf if r.get("best_static")} == {"nanovllm", "llama8b_short", "llama8b_long"}
    assert set(result["ratios"]) >= {"nanovllm: tokenmill / transformers best", "llama8b_long: tokenmill / transformers best"}
    md = next(tmp_path.glob("gpu-*.md")).read_text()
    assert "| nanovllm | tokenmill |" in md and "Decode floor" in md


def _nanovllm_output_lens() -> list[int]:
    sys.path.insert(0, str(ROOT))
    from benchmarks.gpu_bench import random_job, settings

    return random_job("nanovllm", *settings(smoke=True)["nanovllm"], vocab=500, temperature=0.6).output_lens


def test_cpu_peers_harness_runs_tokenmill_at_every_tier(tmp_path):
    """benchmarks/cpu_peers.py (issue 28) end to end on a tiny model with the peers left out: every tier's tokenmill
    row runs in its child process and the report names the peers as not run (never silently dropped)."""
    save_tiny_model("llama", tmp_path / "model")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_peers", "--quick", "--no-peers", "--rounds", "1",
                           "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(next((tmp_path / "out").glob("peers-*.json")).read_text())
    assert result["host"]["cpu"] and result["gemm_gflops"]["bfloat16"] > 0
    for name, wl in result["workloads"].items():
        tm = [r for r in wl["rows"] if r["family"] == "tokenmill"]
        assert [r["tier"] for r in tm] == ["float32", "bfloat16", "int8", "int4", "w8a8"], name
        assert all("missing" not in r and r["output_tokens"] == wl["output_tokens"] for r in tm), tm
        assert all("missing" in r for r in wl["rows"] if r["family"] != "tokenmill")
    md = next((tmp_path / "out").glob("peers-*.md")).read_text()
    assert "### W" in md and "### long" in md and "not run: peers not installed" in md
