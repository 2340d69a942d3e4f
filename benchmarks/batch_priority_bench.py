"""Online requests beside a Batch API batch on one ``tokenmill serve`` (issue 30's two priorities), in one run:

1. the batch alone, on a server of its own that never sees online traffic: a large ``/v1/completions`` batch on W's
   prompts (128 output tokens, ignore_eos); its tokens/s over ``--batch-window`` seconds, from the live page's
   ``/api/status`` (the batch's tokens, counted as its rows finish);
2. on a second server, online alone: closed-loop streamed completions at concurrency 8 on other W prompts: TTFT p50
   / p99 and output tokens/s;
3. both: the same batch started on that server, then the same online load while it runs: TTFT again, and the
   batch's tokens/s over the load's window;
4. online alone once more (the machine's drift), after the batch is cancelled.

Targets (issue 30): online p50 / p99 TTFT with the batch within 1.5x of alone; the batch >= 70% of its rate alone.

``python -m benchmarks.batch_priority_bench --out benchmarks/runs [--requests 48] [--concurrency 8]``
Writes ``batch_priority.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.__main__ import machine_info
from benchmarks.serve_bench import OUTPUT_LEN, Proc, free_port, prompts_w
from benchmarks.serve_load import run_load

KEY = "bench"


def call(base: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def batch_tokens(base: str, batch_id: str) -> tuple[float, int, str]:
    """(time, the batch's tokens so far, its status), from the live page's JSON."""
    job = call(base, "GET", f"/api/status?batch={batch_id}")["jobs"][0]
    return time.monotonic(), int((job["progress"] or {}).get("tokens") or 0), job["status"]


def upload(base: str, path: Path) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key=KEY)
    return client.files.create(file=path.open("rb"), purpose="batch").id


@contextlib.contextmanager
def served(state_dir: Path, serve_args: list[str]):
    port = free_port()
    server = Proc([sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port), "--api-key", KEY,
                   "--state-dir", str(state_dir), *serve_args], "/health", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def start_batch(base: str, rows: Path) -> str:
    """Creates the batch; returns its id once it runs, has finished some rows, and had 5 s more to fill the
    engine."""
    batch = call(base, "POST", "/v1/batches", {"input_file_id": upload(base, rows), "endpoint": "/v1/completions",
                                               "completion_window": "24h"})["id"]
    while True:
        _, tokens, status = batch_tokens(base, batch)
        if status == "in_progress" and tokens > 0:
            break
        time.sleep(0.5)
    time.sleep(5)
    return batch


def online(base: str, model: str, prompts: list[dict], concurrency: int) -> dict:
    return asyncio.run(run_load(base + "/v1", model, prompts, concurrency=concurrency, api_key=KEY,
                                extra={"ignore_eos": True}))


def brief(res: dict) -> dict:
    return {"ttft_p50_ms": res["ttft_ms"]["p50"], "ttft_p99_ms": res["ttft_ms"]["p99"],
            "output_tok_s": res["output_tok_s"], "wall_s": res["wall_s"], "failed": res["failed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/runs")
    ap.add_argument("--requests", type=int, default=48, help="online requests per online phase")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch-rows", type=int, default=4096, help="rows in the batch (it is cancelled at the end)")
    ap.add_argument("--serve-args", default="--no-prefix-caching",
                    help="`tokenmill serve` flags, space-separated (default: no prefix caching, so every online phase "
                         "computes the same prompts cold, none a hit left by an earlier phase)")
    ap.add_argument("--batch-window", type=float, default=60.0, help="seconds the batch alone is measured over")
    args = ap.parse_args()
    prompts = prompts_w(args.requests + args.batch_rows)  # all distinct: none deduplicated, none a cache hit
    online_prompts, batch_prompts = prompts[: args.requests], prompts[args.requests:]
    tmp = Path(tempfile.mkdtemp(prefix="tokenmill-batch-bench-"))
    rows = tmp / "batch.jsonl"
    with rows.open("w") as f:
        for i, p in enumerate(batch_prompts):
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"prompt": p["prompt"], "max_tokens": OUTPUT_LEN, "temperature": 0,
                                         "ignore_eos": True}}) + "\n")
    serve_args = args.serve_args.split()
    result: dict = {"machine": machine_info(),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True).stdout.strip(),
                    "requests": args.requests, "concurrency": args.concurrency, "output_len": OUTPUT_LEN,
                    "serve_args": serve_args, "batch_window_s": args.batch_window}

    # 1. the batch alone, on a server that never saw online traffic (the whole step budget is the batch's)
    with served(tmp / "alone", serve_args) as base:
        batch = start_batch(base, rows)
        t0, k0, _ = batch_tokens(base, batch)
        time.sleep(args.batch_window)
        t1, k1, _ = batch_tokens(base, batch)
        result["batch_alone_tok_s"] = (k1 - k0) / (t1 - t0)
        print(f"batch alone: {result['batch_alone_tok_s']:.1f} tok/s over {t1 - t0:.0f} s", flush=True)

    # 2-4. online alone, online beside the batch, online alone again: one server
    with served(tmp / "both", serve_args) as base:
        model = call(base, "GET", "/v1/models")["data"][0]["id"]
        online(base, model, online_prompts[: args.concurrency], args.concurrency)  # warm-up (kernels, caches)
        alone = online(base, model, online_prompts, args.concurrency)
        result["online_alone"] = brief(alone)
        print(f"online alone: TTFT p50 {alone['ttft_ms']['p50']:.0f} p99 {alone['ttft_ms']['p99']:.0f} ms, "
              f"{alone['output_tok_s']:.1f} out tok/s", flush=True)
        batch = start_batch(base, rows)
        t0, k0, _ = batch_tokens(base, batch)
        both = online(base, model, online_prompts, args.concurrency)
        t1, k1, status = batch_tokens(base, batch)
        assert status == "in_progress", f"the batch ended ({status}) before the online load did: use more rows"
        result["online_with_batch"] = brief(both)
        result["batch_with_online_tok_s"] = (k1 - k0) / (t1 - t0)
        print(f"with the batch: TTFT p50 {both['ttft_ms']['p50']:.0f} p99 {both['ttft_ms']['p99']:.0f} ms, "
              f"{both['output_tok_s']:.1f} out tok/s; the batch {result['batch_with_online_tok_s']:.1f} tok/s",
              flush=True)
        call(base, "POST", f"/v1/batches/{batch}/cancel")
        while call(base, "GET", f"/v1/batches/{batch}")["status"] not in ("cancelled", "completed"):
            time.sleep(0.5)
        again = online(base, model, online_prompts, args.concurrency)
        result["online_alone_after"] = brief(again)
        print(f"online alone again: TTFT p50 {again['ttft_ms']['p50']:.0f} p99 {again['ttft_ms']['p99']:.0f} ms, "
              f"{again['output_tok_s']:.1f} out tok/s", flush=True)
    ref50 = max(result["online_alone"]["ttft_p50_ms"], result["online_alone_after"]["ttft_p50_ms"])
    ref99 = max(result["online_alone"]["ttft_p99_ms"], result["online_alone_after"]["ttft_p99_ms"])
    result["ratios"] = {
        "ttft_p50_with_batch_over_alone": result["online_with_batch"]["ttft_p50_ms"] / ref50,
        "ttft_p99_with_batch_over_alone": result["online_with_batch"]["ttft_p99_ms"] / ref99,
        "batch_with_online_over_alone": result["batch_with_online_tok_s"] / result["batch_alone_tok_s"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_priority.json").write_text(json.dumps(result, indent=1))
    r = result["ratios"]
    print("\n| | TTFT p50 (ms) | TTFT p99 (ms) | online out tok/s | batch tok/s |\n|---|---|---|---|---|")
    for name, key in (("online alone", "online_alone"), ("online + batch", "online_with_batch"),
                      ("online alone, after", "online_alone_after")):
        o = result[key]
        b = result["batch_with_online_tok_s"] if key == "online_with_batch" else None
        print(f"| {name} | {o['ttft_p50_ms']:.0f} | {o['ttft_p99_ms']:.0f} | {o['output_tok_s']:.1f} | "
              f"{'' if b is None else f'{b:.1f}'} |")
    print(f"| batch alone | | | | {result['batch_alone_tok_s']:.1f} |")
    print(f"\nTTFT with the batch / alone (the worse alone run): p50 {r['ttft_p50_with_batch_over_alone']:.2f}x, "
          f"p99 {r['ttft_p99_with_batch_over_alone']:.2f}x (target <= 1.5x); the batch beside online / alone "
          f"{r['batch_with_online_over_alone']:.2f} (target >= 0.70)")


if __name__ == "__main__":
    main()
