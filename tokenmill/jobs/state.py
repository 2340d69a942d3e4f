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


class StateFile:
    def __init__(self, path: Path, interval: float = 2.0) -> None:
        self.path = path
        self.interval = interval
        self._last = 0.0

    def write(self, data: dict, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            write_json_atomic(self.path, {**data, "pid": os.getpid(), "host": socket.gethostname(),
                                          "updated_at": time.time()})
            self._last = now

    def write_due(self, snapshot) -> None:
        """Writes ``snapshot()`` if the interval has passed; the snapshot is only built then (the job loop calls
        this every step)."""
        if time.monotonic() - self._last >= self.interval:
            self.write(snapshot(), force=True)
