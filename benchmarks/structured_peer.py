"""llama.cpp's grammar-constrained decoding on ``structured_bench``'s extraction rows, the peer of that table.

``llama-server`` (same GGUF, CPU, ``-np`` slots, continuous batching) gets the same chat requests over its
OpenAI-compatible API at concurrency ``--concurrency``, greedy, 64 tokens at most: unconstrained, then with
``response_format: {"type": "json_schema", ...}`` (llama.cpp turns the schema into a GBNF grammar). Reports the share
of outputs that parse and validate and the output tok/s of each.

``python -m benchmarks.structured_peer [--llama-server PATH] [--concurrency 16] [--rows 256]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.prefix_peer import free_port
from benchmarks.serve_bench import Proc
from benchmarks.structured_bench import SCHEMA, rows, valid


async def run(base_url: str, data: list[dict], concurrency: int, constrained: bool) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="none", timeout=3600, max_retries=0)
    limit = asyncio.Semaphore(concurrency)
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "profile", "strict": True,
                                                                        "schema": SCHEMA}}} if constrained else {}

    async def one(r):
        async with limit:
            out = await client.chat.completions.create(model="m", messages=r["messages"], max_tokens=r["max_tokens"],
                                                       temperature=0, **extra)
            return out.choices[0].message.content or "", out.usage.completion_tokens

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(r) for r in data))
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(n for _, n in results)
    return {"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "valid": sum(valid(t) for t, _ in results) / len(results)}


def main() -> None:
    beside = Path(sys.executable).parent / "llama-server"
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", default=str(beside) if beside.exists() else shutil.which("llama-server"))
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rows", type=int, default=256)
    a = ap.parse_args()
    from tokenmill.model.loader import default_model_path

    data = rows(a.rows)
    c = a.concurrency
    port = free_port()
    server = Proc([a.llama_server, "-m", str(default_model_path()), "--port", str(port), "--host", "127.0.0.1",
                   "-np", str(c), "-c", str(512 * c), "-t", str(os.cpu_count()), "-cb", "--no-webui"], "/health", port)
    out = {}
    try:
        for constrained in (False, True):
            r = asyncio.run(run(server.base_url, data, c, constrained))
            out["json_schema" if constrained else "unconstrained"] = r
            print(f"llama-server -np {c}, {'json_schema' if constrained else 'unconstrained'}: {r['wall_s']:.1f} s, "
                  f"{r['output_tok_s']:.1f} output tok/s, {100 * r['valid']:.1f}% valid", flush=True)
    finally:
        server.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
