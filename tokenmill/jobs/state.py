"""The job's state file (OUTPUT.state.json, replaced atomically every ~2 s) and ``tokenmill status``."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from tokenmill.jobs.files import write_json_atomic


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_status(path: Path) -> dict:
    """The state file's content; a 'running' job whose process is gone is reported as 'interrupted' (checked only
    on the machine that wrote it: a --ray driver's output is read from other machines too)."""
    data = json.loads(path.read_text())
    here = data.get("host") in (None, socket.gethostname())
    if data.get("state") == "running" and here and not pid_alive(int(data.get("pid", -1))):
        data["state"] = "interrupted"
    return data


def try_read_status(path: Path) -> dict | None:
    """``read_status``, or None when there is no state file (yet) or it cannot be read."""
    try:
        return read_status(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def request_counts(st: dict) -> dict:
    """A job's state as the Batch API counts requests: every line (valid rows and bad lines), done, failed."""
    failed = int(st.get("failed") or 0)
    return {"total": int(st.get("total") or 0) + failed, "completed": int(st.get("done") or 0), "failed": failed}


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "unknown"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_status(d: dict) -> str:
    total = d.get("total", 0)
    done = d.get("done", 0)
    pct = 100.0 * done / total if total else 100.0
    if d.get("kind") == "embed":
        counts = f"texts:        {done} / {total} done ({pct:.1f}%), {d.get('failed', 0)} failed"
        rates = f"throughput:   {d.get('texts_s', 0):.1f} texts/s, {d.get('prompt_tok_s', 0):.1f} tok/s"
    else:
        counts = f"requests:     {done} / {total} done ({pct:.1f}%), {d.get('failed', 0)} failed"
        rates = (f"throughput:   {d.get('prompt_tok_s', 0):.1f} prompt tok/s, {d.get('gen_tok_s', 0):.1f} generation "
                 f"tok/s")
    lines = [f"state:        {d['state']}", counts, rates, f"elapsed:      {format_duration(d.get('elapsed_s'))}"]
    if d.get("prefix_cache_hit_rate") is not None:
        lines.append(f"prefix cache: {100 * d['prefix_cache_hit_rate']:.1f}% of prompt tokens hit")
    if d.get("deduplicated"):
        lines.append(f"deduplicated: {d['deduplicated']:,} rows computed once for an identical row")
    ray = d.get("ray")
    if ray:  # a --ray job
        workers = ray.get("workers", [])
        busy = sum(w.get("state") == "busy" for w in workers)
        lines.append(f"shards:       {ray.get('shards_done', 0)} / {ray.get('shards_total', 0)} done; "
                     f"{ray.get('reissued', 0)} re-issued as stragglers, {ray.get('retried', 0)} re-run after "
                     f"{ray.get('workers_lost', 0)} lost workers")
        if d["state"] == "running":
            lines.append(f"workers:      {len(workers)} ({busy} busy): " + ", ".join(
                f"{w['id']}@{w.get('host') or '?'}{':' + w['shard'] if w.get('shard') else ''}" for w in workers[:8])
                + (" ..." if len(workers) > 8 else ""))
    if d["state"] == "running":
        lines.append(f"ETA:          {format_duration(d.get('eta_s'))}")
    if d.get("message"):
        lines.append(f"note:         {d['message']}")
    updated = d.get("updated_at")
    if updated:
        lines.append(f"updated:      {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(updated))}")
    return "\n".join(lines)


HISTORY_POINTS = 240  # at most this many points in a state file's history (older ones thinned as it grows)


class StateFile:
    """The job's state file, replaced atomically at most every ``interval`` seconds.

    Besides the job's snapshot it carries, for the live page (``serve/page.py``), what outlives one run of the job:
    ``history``, points ``[unix time, rows done, tokens processed, run]`` (tokens counted over every run of the job;
    ``run`` counts the job's runs, so no rate is drawn across a restart), thinned to every other point when it reaches
    ``HISTORY_POINTS`` (a day-long job keeps a day-long chart); and ``elapsed_total_s``, the seconds every run of the
    job has taken (what a machine-hour rate is charged for). A snapshot gives ``prompt_tokens`` / ``gen_tokens``, its
    run's token counts so far. Both carry over from the file an earlier run left (a resume), read at the first write
    (after ``--overwrite`` removed it), unless it is unreadable.
    """

    def __init__(self, path: Path, interval: float = 2.0) -> None:
        self.path = path
        self.interval = interval
        self._last = 0.0
        self.history: list[list] | None = None  # None until the first write reads what an earlier run left
        self._base_tokens = 0
        self._base_elapsed = 0.0
        self._run = 0

    def _carry_over(self) -> None:
        self.history = []
        try:
            old = json.loads(self.path.read_text())
            history = old.get("history") or []
            if history:
                self._base_tokens, self._run = int(history[-1][2]), int(history[-1][3]) + 1
                self.history = [list(p) for p in history]
            self._base_elapsed = float(old.get("elapsed_total_s") or old.get("elapsed_s") or 0.0)
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
            pass

    def _with_history(self, data: dict) -> dict:
        if self.history is None:
            self._carry_over()
        now = time.time()
        tokens = self._base_tokens + int(data.get("prompt_tokens") or 0) + int(data.get("gen_tokens") or 0)
        point = [round(now, 2), int(data.get("done") or 0), tokens, self._run]
        if self.history and self.history[-1][3] == self._run and now - self.history[-1][0] < 0.5:
            self.history[-1] = point  # a forced write right after a timed one: one point, not two
        else:
            self.history.append(point)
        if len(self.history) >= HISTORY_POINTS:
            self.history = self.history[::2] + ([self.history[-1]] if len(self.history) % 2 == 0 else [])
        return {**data, "elapsed_total_s": self._base_elapsed + float(data.get("elapsed_s") or 0.0),
                "history": self.history}

    def write(self, data: dict, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            write_json_atomic(self.path, {**self._with_history(data), "pid": os.getpid(), "host": socket.gethostname(),
                                          "updated_at": time.time()}, indent=None)
            self._last = now

    def write_due(self, snapshot) -> None:
        """Writes ``snapshot()`` if the interval has passed; the snapshot is only built then (the job loop calls
        this every step)."""
        if time.monotonic() - self._last >= self.interval:
            self.write(snapshot(), force=True)
