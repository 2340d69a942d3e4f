"""The brief's hand-made dynamic-batching server (seed 001): an asyncio queue, a batch worker that wakes every
``max_wait_ms``, takes up to ``max_batch_size`` requests and runs one static, left-padded transformers ``generate``
over them; every request of the batch waits for the longest. The naive baseline for ``tokenmill serve``.

It speaks just enough of the OpenAI completions API for ``benchmarks/serve_load.py``: POST /v1/completions with
token-id (or text) prompts, ``stream`` (the whole completion arrives as one chunk when its batch ends, so its TTFT is
its latency), ``stream_options.include_usage`` and ``ignore_eos``; GET /v1/models.

``python -m benchmarks.naive_server --port 8100 [--max-batch-size 64 --max-wait-ms 20 --dtype float32]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass

import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse


@dataclass
class Pending:
    ids: list[int]
    max_tokens: int
    ignore_eos: bool
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, model, tokenizer, max_batch_size: int, max_wait_ms: float) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.queue: deque[Pending] = deque()

    async def worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.max_wait)
            if not self.queue:
                continue
            batch = [self.queue.popleft() for _ in range(min(self.max_batch_size, len(self.queue)))]
            try:
                outs = await loop.run_in_executor(None, self._generate, batch)
                for p, out in zip(batch, outs):
                    p.future.set_result(out)
            except Exception as e:
                for p in batch:
                    p.future.set_exception(e)

    @torch.inference_mode()
    def _generate(self, batch: list[Pending]) -> list[list[int]]:
        width = max(len(p.ids) for p in batch)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch])
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch])
        new = max(p.max_tokens for p in batch)
        kw = {"min_new_tokens": new} if all(p.ignore_eos for p in batch) else {}
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                  pad_token_id=pad, **kw)
        eos = self.tokenizer.eos_token_id
        res = []
        for p, row in zip(batch, out[:, width:].tolist()):
            row = row[: p.max_tokens]
            if not p.ignore_eos and eos in row:
                row = row[: row.index(eos) + 1]
            res.append(row)
        return res


def build_app(model_path: str, max_batch_size: int, max_wait_ms: float, dtype: str = "float32") -> FastAPI:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.model.loader import resolve_model_path

    path = resolve_model_path(model_path)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    src = str(path.parent) if path.suffix == ".gguf" else str(path)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype), **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    batcher = DynamicBatcher(model, tokenizer, max_batch_size, max_wait_ms)
    name = path.stem

    async def lifespan(app):
        task = asyncio.create_task(batcher.worker())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "naive"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt).input_ids
        fut = asyncio.get_running_loop().create_future()
        batcher.queue.append(Pending(ids, int(body.get("max_tokens", 16)), bool(body.get("ignore_eos")), fut))
        out = await fut
        text = tokenizer.decode(out, skip_special_tokens=True)
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}
        base = {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if not body.get("stream"):
            return {**base, "choices": [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}],
                    "usage": usage}

        async def events():
            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'text': text, 'finish_reason': 'length'}]})}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    uvicorn.run(build_app(args.model, args.max_batch_size, args.max_wait_ms, args.dtype), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
