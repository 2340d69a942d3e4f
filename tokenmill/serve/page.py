"""The live page: ``/`` (every batch and the engine's load) and ``/batches/{id}`` (one batch), plain HTML
(``static/page.html``, no build step) whose script polls ``GET /api/status`` once a second.

The same page serves one ``tokenmill run`` / ``embed`` job: ``tokenmill status --web OUTPUT`` starts a small server on
127.0.0.1 whose ``/api/status`` reads the job's state file (``jobs/state.py``).

``/api/status`` answers ``{"kind": "server" | "job", "now", "server": {...} | null, "jobs": [job, ...]}``; a job is
``{"id", "title", "status", "endpoint", "created_at", "request_counts": {"total", "completed", "failed"},
"progress": {...} | null, "files": {...}, "errors": [...], "metadata", "usage"}`` where ``progress`` is what its state
file says: rates, ETA, the seconds every run took, the cost at the hourly rate, and the history the chart draws
(points ``[unix time, rows done, tokens, run]``). The page itself holds no data, so it is served without the API key;
``/api/status`` is under the key like ``/v1/`` (the page asks for it once and keeps it in the browser).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

from tokenmill.jobs.cost import job_cost
from tokenmill.jobs.files import JobPaths
from tokenmill.jobs.state import request_counts, try_read_status

PAGE_FILE = Path(__file__).parent / "static" / "page.html"
LISTED_BATCHES = 50  # the newest batches the list page shows


def job_progress(st: dict | None, hourly_rate: float | None, num_gpus: int = 1) -> dict | None:
    """What the page shows of a job's state file: counts, rates, ETA, time, cost, and the chart's history."""
    if st is None:
        return None
    history = st.get("history") or []
    tokens = history[-1][2] if history else int(st.get("prompt_tokens") or 0) + int(st.get("gen_tokens") or 0)
    elapsed = float(st.get("elapsed_total_s") or st.get("elapsed_s") or 0.0)
    out = {k: st.get(k) for k in ("state", "done", "total", "failed", "prompt_tok_s", "gen_tok_s", "eta_s", "message",
                                  "updated_at", "prefix_cache_hit_rate", "deduplicated", "kind")}
    out.update(elapsed_s=elapsed, tokens=tokens, history=history)
    if hourly_rate is not None:
        cost = job_cost(num_gpus, hourly_rate, elapsed)
        out["cost_usd"] = cost
        out["usd_per_million_tokens"] = cost / tokens * 1e6 if tokens else None
    return out


def page_response() -> HTMLResponse:
    return HTMLResponse(PAGE_FILE.read_text(encoding="utf-8"))


def add_page_routes(app: FastAPI, status) -> None:
    """``/``, ``/batches/{id}`` and ``/api/status``; ``status(batch_id | None)`` builds the JSON (in a thread: it
    reads files)."""

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page_response()

    @app.get("/batches/{batch_id}", response_class=HTMLResponse, include_in_schema=False)
    async def batch_page(batch_id: str):
        return page_response()

    @app.get("/api/status")
    async def api_status(batch: str | None = None):
        return await asyncio.to_thread(status, batch)


# ------------------------------------------------------------------------------------------------ the server's view
def server_status(state, batch_id: str | None, hourly_rate: float | None) -> dict:
    """``/api/status`` of ``tokenmill serve``: the engine's load and the newest batches (or the one asked for)."""
    from tokenmill.serve.protocol import ApiError
    from tokenmill.serve.state_store import with_live_counts

    store = state.store
    if batch_id is not None:
        b = store.get_batch(batch_id)
        if b is None:
            raise ApiError(404, f"No such Batch object: {batch_id}", param="batch")
        batches = [b]
    else:
        batches = store.list_batches(None, LISTED_BATCHES)[0]
    jobs = []
    for b in batches:
        st = store.batch_state(b["id"])  # read once: the live counts and the progress
        b = with_live_counts(b, st)
        jobs.append({"id": b["id"], "title": b["id"], "status": b["status"], "endpoint": b["endpoint"],
                     "created_at": b["created_at"], "request_counts": b["request_counts"],
                     "progress": job_progress(st, hourly_rate),
                     "files": {k: b[k] for k in ("input_file_id", "output_file_id", "error_file_id")},
                     "errors": (b["errors"] or {}).get("data") or [], "metadata": b["metadata"],
                     "usage": b.get("usage")})
    if state.load_error or (state.engine is not None and state.engine.dead):
        status = "error"
    else:
        status = "ok" if state.ready else "loading"
    server = {"model": state.model_name, "status": status,
              "detail": state.load_error or (state.engine.dead if state.engine is not None else None),
              "gpu_hourly_rate": hourly_rate, **(state.engine.load if state.engine is not None else {})}
    return {"kind": "server", "now": time.time(), "server": server, "jobs": jobs}


# ------------------------------------------------------------------------------------------ one job: status --web
def job_status(output: Path, hourly_rate: float | None, num_gpus: int = 1) -> dict:
    """``/api/status`` of ``tokenmill status --web OUTPUT``: that job, from its state file."""
    paths = JobPaths(output)
    st = try_read_status(paths.state)
    job = {"id": output.name, "title": str(output), "status": st["state"] if st else "unknown", "endpoint": None,
           "created_at": None, "request_counts": request_counts(st or {}),
           "progress": job_progress(st, hourly_rate, num_gpus), "files": {"output": str(paths.output),
                                                                          "errors": str(paths.errors)},
           "errors": [], "metadata": None, "usage": None}
    return {"kind": "job", "now": time.time(), "server": None, "jobs": [job]}


def status_app(output: Path, hourly_rate: float | None, num_gpus: int = 1) -> FastAPI:
    app = FastAPI(title="tokenmill status")
    add_page_routes(app, lambda batch: job_status(output, hourly_rate, num_gpus))
    return app


def serve_status(output: Path, host: str, port: int, hourly_rate: float | None, num_gpus: int = 1) -> int:
    """Serves the page for one job until interrupted (Ctrl-C)."""
    import uvicorn

    from tokenmill.jobs.progress import say

    say(f"the page for {output} is on http://{host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(status_app(output, hourly_rate, num_gpus), host=host, port=port, log_level="warning",
                access_log=False)
    return 0
