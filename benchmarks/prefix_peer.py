"""llama.cpp's prefix reuse on workload P, for the prefix-caching table: ``llama-server`` (same GGUF, CPU, ``-np``
slots, continuous batching) with its prompt cache on (``cache_prompt: true``: a request reuses the longest common
prefix of the slot it lands on, and slots are picked by prompt similarity) and off, at concurrency ``--concurrency``
with as many slots. The same 256 token-id prompts as ``prefix_bench``'s P (8 shuffled 1,000-token preambles + a
question), 32 output tokens, greedy. Total tok/s = (prompt + output tokens) / wall.

``python -m benchmarks.prefix_peer [--llama-server PATH] [--concurrency 16]`` (``make bench-peers`` builds it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import sys
from pathlib import Path

from benchmarks.prefix_bench import preamble_rows
from benchmarks.serve_bench import Proc
from benchmarks.serve_load import run_load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    beside = Path(sys.executable).parent / "llama-server"
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", default=str(beside) if beside.exists() else shutil.which("llama-server"))
    ap.add_argument("--concurrency", type=int, default=16)
    a = ap.parse_args()
    from tokenmill.model.loader import default_model_path, load_tokenizer, read_model_config

    hf_dir, _ = read_model_config(default_model_path())
    rows = preamble_rows(load_tokenizer(hf_dir), random.Random(1), 8, 32, 1000, 32)
    prompts = [{"prompt": r["prompt"], "max_tokens": r["max_tokens"]} for r in rows]
    prompt_tokens = sum(len(p["prompt"]) for p in prompts)
    c = a.concurrency
    out = {}
    for cache in (False, True):
        port = free_port()
        server = Proc([a.llama_server, "-m", str(default_model_path()), "--port", str(port), "--host", "127.0.0.1",
                       "-np", str(c), "-c", str(1200 * c), "-t", str(os.cpu_count()), "-cb", "--no-webui"],
                      "/health", port)
        try:
            r = asyncio.run(run_load(server.base_url, "m", prompts, concurrency=c,
                                     extra={"cache_prompt": cache, "temperature": 0}))
        finally:
            server.stop()
        out_tokens = r["output_tok_s"] * r["wall_s"]
        r["total_tok_s"] = (prompt_tokens + out_tokens) / r["wall_s"]
        out["cache_prompt on" if cache else "cache_prompt off"] = r
        print(f"llama-server -np {c}, cache_prompt {cache}: {r['completed']}/{len(prompts)} ok, "
              f"{r['wall_s']:.1f} s, {r['total_tok_s']:.1f} total tok/s", flush=True)
    print(json.dumps({k: {x: v[x] for x in ("wall_s", "total_tok_s", "completed")} for k, v in out.items()}))


if __name__ == "__main__":
    main()
