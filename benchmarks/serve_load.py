"""A load generator for any OpenAI-compatible server (tokenmill serve, llama-server, vLLM, ...).

``python -m benchmarks.serve_load --base-url http://127.0.0.1:8000/v1 --prompts W.jsonl --concurrency 32``
(or ``--request-rate R`` for Poisson arrivals, seeded). Requests are streamed completions, read as raw server-sent
events over aiohttp as ``vllm bench serve`` does: the client shares the cores with a local server, so it must be cheap
per chunk (the ``openai`` client cost ~150 us of CPU per chunk, ~8% of a 2-core machine at saturation), and its own
CPU time is reported (``client_cpu_s``). Each line of the prompts file is ``{"prompt": str | [token ids],
"max_tokens": N}``. Reports, as ``vllm bench serve`` defines them: request and output-token throughput; TTFT (first
content chunk), TPOT ((latency - TTFT) / (output tokens - 1)), ITL (gaps between streamed chunks) and end-to-end
latency at p50 / p90 / p99; goodput (requests/s meeting every SLO).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestResult:
    ok: bool
    status: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


async def one_request(session, url: str, headers: dict, model: str, prompt, max_tokens: int,
                      extra: dict) -> RequestResult:
    """One streamed completion, read as raw server-sent events (as ``vllm bench serve`` does, with aiohttp): the
    client shares the machine's cores with the server under test, so it must cost little per chunk."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    t0 = time.perf_counter()
    first = last = None
    itl: list[float] = []
    tokens = 0
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                return RequestResult(False, f"HTTP {resp.status}: {(await resp.text())[:80]}")
            async for line in resp.content:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    break
                now = time.perf_counter()
                ch = json.loads(data)
                if "error" in ch:
                    return RequestResult(False, f"stream error: {str(ch['error'])[:80]}")
                if ch.get("usage"):
                    tokens = ch["usage"]["completion_tokens"]
                if ch.get("choices") and ch["choices"][0].get("text"):
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
    except Exception as e:  # a dropped connection: counted, not fatal
        return RequestResult(False, f"{type(e).__name__}: {str(e)[:80]}")
    end = time.perf_counter()
    if first is None:
        return RequestResult(False, "no content")
    return RequestResult(True, "ok", first - t0, end - t0, tokens or len(itl) + 1, itl)


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(xs) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


async def run_load(base_url: str, model: str, prompts: list[dict], concurrency: int | None = None,
                   request_rate: float | None = None, api_key: str = "none", seed: int = 0,
                   slo_ttft_ms: float = 2000.0, slo_tpot_ms: float = 200.0, extra: dict | None = None) -> dict:
    import aiohttp

    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    # a fresh connection per request, as vllm bench serve opens one: a server that closes kept-alive connections
    # (llama-server after a few requests) would otherwise fail the requests sent on them
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600),
                                    connector=aiohttp.TCPConnector(limit=0, force_close=True))
    limit = asyncio.Semaphore(concurrency or len(prompts))
    rng = random.Random(seed)
    extra = extra or {}

    async def limited(p):
        async with limit:
            return await one_request(session, url, headers, model, p["prompt"], p["max_tokens"], extra)

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    tasks = []
    for p in prompts:
        tasks.append(asyncio.create_task(limited(p)))
        if request_rate:
            await asyncio.sleep(rng.expovariate(request_rate))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    await session.close()
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [r for r in ok if r.ttft * 1000 <= slo_ttft_ms and (r.tpot is None or r.tpot * 1000 <= slo_tpot_ms)]
    return {
        "concurrency": concurrency, "request_rate": request_rate, "num_requests": len(prompts),
        "completed": len(ok), "failed": len(results) - len(ok),
        "failures": sorted({r.status for r in results if not r.ok})[:5],
        "wall_s": wall, "client_cpu_s": client_cpu, "request_throughput": len(ok) / wall, "output_tok_s": out_tokens / wall,
        "goodput_req_s": len(good) / wall, "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "ttft_ms": percentiles([r.ttft for r in ok]),
        "tpot_ms": percentiles([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": percentiles([x for r in ok for x in r.itl]),
        "e2e_ms": percentiles([r.latency for r in ok]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", default=None, help="default: the server's first model")
    ap.add_argument("--prompts", required=True, help="JSONL of {prompt, max_tokens}")
    ap.add_argument("--num-requests", type=int, default=None)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--concurrency", type=int, default=None)
    g.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals, requests/s")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM / llama-server extension)")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    prompts = [json.loads(x) for x in open(args.prompts) if x.strip()]
    if args.num_requests:
        prompts = (prompts * (args.num_requests // len(prompts) + 1))[: args.num_requests]
    model = args.model
    if model is None:
        from openai import OpenAI

        model = OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    res = asyncio.run(run_load(args.base_url, model, prompts, args.concurrency, args.request_rate, args.api_key,
                               args.seed, args.slo_ttft_ms, args.slo_tpot_ms,
                               {"ignore_eos": True} if args.ignore_eos else None))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

