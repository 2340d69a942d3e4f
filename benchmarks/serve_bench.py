"""Online serving, side by side in one run: ``tokenmill serve``, llama.cpp's ``llama-server`` (same GGUF, CPU, ``-np``
= concurrency, continuous batching) and the brief's naive dynamic-batching server (``benchmarks/naive_server.py``),
swept over concurrency 1, 4, 16, 32, 64, 128 on W-like chat prompts (128 output tokens, ignore_eos); the offline
``LLM.generate`` rate on the same requests; and a burst of 1,000 requests at once against tokenmill.

``python -m benchmarks.serve_bench --out benchmarks/results [--llama-server PATH] [--levels 1,4,16,32,64,128]``
Writes ``serve.json``, ``serve.md`` and ``serve_knee.png`` (output tok/s against p99 TTFT, the knee marked: the lowest
concurrency that reaches 90% of the server's peak throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.serve_load import run_load

LEVELS = (1, 4, 16, 32, 64, 128)
OUTPUT_LEN = 128


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


class Proc:
    def __init__(self, cmd: list[str], health: str, port: int) -> None:
        self.port = port
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_ready(f"http://127.0.0.1:{port}{health}", self.proc)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompts_w(n: int) -> list[dict]:
    from tokenmill.model.loader import default_model_path, load_tokenizer, read_model_config

    from benchmarks.workloads import workload_w

    hf_dir, _ = read_model_config(default_model_path())
    w = workload_w(load_tokenizer(hf_dir), num_prompts=n, output_len=OUTPUT_LEN)
    return [{"prompt": p, "max_tokens": o} for p, o in zip(w.prompts, w.output_lens)]


def n_requests(c: int) -> int:
    return min(max(2 * c, 16), 256)


def sweep(name: str, start, prompts: list[dict], levels, per_level_server: bool) -> list[dict]:
    rows = []
    server = None if per_level_server else start(max(levels))
    try:
        for c in levels:
            if per_level_server:
                server = start(c)
            model = json.load(urllib.request.urlopen(f"{server.base_url}/models"))["data"][0]["id"]
            res = asyncio.run(run_load(server.base_url, model, prompts[: n_requests(c)], concurrency=c,
                                       extra={"ignore_eos": True}))
            res["server"] = name
            rows.append(res)
            print(f"{name:>12} c={c:>3}: {res['output_tok_s']:7.1f} out tok/s, TTFT p50 {res['ttft_ms']['p50']:8.1f} "
                  f"p99 {res['ttft_ms']['p99']:8.1f} ms, failed {res['failed']}", flush=True)
            if per_level_server:
                server.stop()
                server = None
    finally:
        if server is not None:
            server.stop()
    return rows


def offline_rate(prompts: list[dict]) -> dict:
    from tokenmill import LLM, SamplingParams

    llm = LLM()
    sp = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([p["prompt"] for p in prompts], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    return {"requests": len(prompts), "wall_s": wall, "output_tok_s": sum(len(o.token_ids) for o in outs) / wall}


def burst(prompts: list[dict], n: int = 1000) -> dict:
    """n requests at once (short outputs) against tokenmill serve with its default queue: each gets a completion or
    a 429; afterwards /metrics must show nothing running or waiting and an empty KV cache."""
    port = free_port()
    s = Proc([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), "--max-queued-requests", "512"],
             "/health", port)
    try:
        model = json.load(urllib.request.urlopen(f"{s.base_url}/models"))["data"][0]["id"]
        batch = [{"prompt": prompts[i % len(prompts)]["prompt"], "max_tokens": 16} for i in range(n)]
        res = asyncio.run(run_load(s.base_url, model, batch, concurrency=n, extra={"ignore_eos": True}))
        time.sleep(1.0)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        gauges = {k.split("{")[0].removeprefix("tokenmill:"): float(v) for k, v in
                  (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
                  if k.split("{")[0] in ("tokenmill:num_requests_running", "tokenmill:num_requests_waiting",
                                         "tokenmill:kv_cache_usage_perc")}
        alive = s.proc.poll() is None
    finally:
        s.stop()
    return {"requests": n, "completed": res["completed"], "rejected": res["failed"], "failures": res["failures"],
            "server_alive_after": alive, "after": gauges, "wall_s": res["wall_s"]}


def knee(rows: list[dict]) -> dict:
    peak = max(r["output_tok_s"] for r in rows)
    return next(r for r in rows if r["output_tok_s"] >= 0.9 * peak)


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, rows in results.items():
        xs = [r["ttft_ms"]["p99"] / 1000 for r in rows]
        ys = [r["output_tok_s"] for r in rows]
        ax.plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(str(r["concurrency"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        k = knee(rows)
        ax.scatter([k["ttft_ms"]["p99"] / 1000], [k["output_tok_s"]], s=160, facecolors="none", edgecolors="red")
    ax.set_xscale("log")
    ax.set_xlabel("p99 time to first token (s, log)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Concurrency sweep (labels: concurrency; red circle: the knee)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    beside = Path(sys.executable).parent / "llama-server"  # where `make bench-peers` puts it
    ap.add_argument("--llama-server", default=str(beside) if beside.exists() else shutil.which("llama-server"))
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument("--skip", default="", help="comma list of: tokenmill, llama-server, naive, offline, burst")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    levels = [int(x) for x in args.levels.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    prompts = prompts_w(256)

    from tokenmill.model.loader import default_model_path

    gguf = str(default_model_path())

    def tokenmill_server(c):
        port = free_port()
        return Proc([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port)], "/health", port)

    def llama_server(c):
        port = free_port()
        return Proc([args.llama_server, "-m", gguf, "--port", str(port), "--host", "127.0.0.1", "-np", str(c),
                     "-c", str(512 * c), "-t", str(os.cpu_count()), "-cb", "--no-webui"], "/health", port)

    def naive_server(c):
        port = free_port()
        return Proc([sys.executable, "-m", "benchmarks.naive_server", "--port", str(port)], "/v1/models", port)

    results: dict[str, list[dict]] = {}
    if "tokenmill" not in skip:
        results["tokenmill serve"] = sweep("tokenmill", tokenmill_server, prompts, levels, False)
    if "llama-server" not in skip and args.llama_server:
        results["llama-server"] = sweep("llama-server", llama_server, prompts, levels, True)
    if "naive" not in skip:
        results["naive (seed 001)"] = sweep("naive", naive_server, prompts, levels, False)
    report = {"levels": levels, "output_len": OUTPUT_LEN, "sweep": results}
    if "offline" not in skip:
        report["offline"] = offline_rate(prompts)
        print("offline LLM.generate:", report["offline"], flush=True)
    if "burst" not in skip:
        report["burst"] = burst(prompts)
        print("burst:", report["burst"], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report["commit"] = commit
    (out / "serve.json").write_text(json.dumps(report, indent=1))
    if results:
        plot(results, out / "serve_knee.png")
    lines = ["| server | concurrency | requests | out tok/s | req/s | TTFT p50 / p99 ms | TPOT p50 ms | ITL p50 ms | "
             "E2E p50 / p99 ms | failed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        for r in rows:
            lines.append(f"| {name} | {r['concurrency']} | {r['num_requests']} | {r['output_tok_s']:.1f} | "
                         f"{r['request_throughput']:.2f} | {r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p99']:.0f} | "
                         f"{(r['tpot_ms']['p50'] or 0):.1f} | {(r['itl_ms']['p50'] or 0):.1f} | "
                         f"{r['e2e_ms']['p50']:.0f} / {r['e2e_ms']['p99']:.0f} | {r['failed']} |")
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
