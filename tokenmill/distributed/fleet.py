"""The fleet planner (``tokenmill plan INPUT --deadline 12h --gpu-hourly-rate USD``): how many workers finish a
dataset by a deadline, with the straggler margin built in, and what that costs on demand and on spot.

Work is counted in tokens: every valid row's prompt plus its expected output (``max_tokens`` times the share of it a
calibration run actually generated, 1.0 without one). One worker's speed is ``tok_per_s`` (prompt + output tokens
a second, given or measured by ``--calibrate``). The shard size is the one ``--ray`` would choose for that many
workers, and the margin is the slowest shard's time (shards cut in input order, as the job cuts them): the last
shard handed out can start as late as ``deadline - margin`` and still finish. So

    workers = ceil(single-worker time / (deadline - margin)),  makespan ~ single-worker time / workers + margin.

The shard size depends on the worker count and the margin on the shard size; more workers only shrink both terms,
so the smallest count that fits is found by bisection. Cost: workers x makespan x hourly rate; spot: the same at ``(1 - spot_discount)`` of the rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import numpy as np

from tokenmill.distributed.driver import default_shard_size

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'12h', '90m', '1.5h', '3600s', '2d', or a plain number of seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"not a duration: {text!r} (use e.g. 12h, 90m, 1.5h, 3600s)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


@dataclass
class FleetPlan:
    rows: int
    work_tokens: float
    tok_per_s: float
    output_ratio: float
    single_worker_s: float
    deadline_s: float
    workers: int
    shard_size: int
    num_shards: int
    slowest_shard_s: float
    makespan_s: float
    hourly_rate: float
    spot_discount: float
    cost_on_demand: float
    cost_spot: float
    calibrated: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def render(self) -> str:
        from tokenmill.jobs.state import format_duration as d

        how = "measured on a sample here (--calibrate)" if self.calibrated else "given (--tok-per-s)"
        return "\n".join([
            f"fleet plan for a deadline of {d(self.deadline_s)}:",
            f"  work:             {self.rows} rows, {self.work_tokens:,.0f} tokens (prompt + expected output, "
            f"{self.output_ratio:.2f} x max_tokens)",
            f"  one worker:       {self.tok_per_s:,.1f} tok/s {how}: {d(self.single_worker_s)} alone",
            f"  workers:          {self.workers}",
            f"  shards:           {self.num_shards} of up to {self.shard_size} rows (--shard-size); the slowest takes "
            f"{d(self.slowest_shard_s)}: the straggler margin",
            f"  expected finish:  {d(self.makespan_s)}",
            f"  cost on demand:   ${self.cost_on_demand:,.2f} ({self.workers} x ${self.hourly_rate:.2f}/h for "
            f"{d(self.makespan_s)})",
            f"  cost on spot:     ${self.cost_spot:,.2f} (at {100 * (1 - self.spot_discount):.0f}% of the rate; "
            f"preempted shards run again, so leave some slack)",
        ])


def _slowest_shard(work_per_row: np.ndarray, shard_size: int) -> float:
    """Most work in one shard when rows are cut in input order."""
    n = len(work_per_row)
    if n == 0:
        return 0.0
    return float(np.add.reduceat(work_per_row, np.arange(0, n, shard_size)).max())


def plan_fleet(prompt_tokens, max_tokens, tok_per_s: float, deadline_s: float, hourly_rate: float,
               spot_discount: float = 0.6, output_ratio: float = 1.0, calibrated: bool = False) -> FleetPlan:
    """``prompt_tokens`` / ``max_tokens``: per valid row, in input order."""
    if tok_per_s <= 0:
        raise ValueError(f"tok/s must be > 0, got {tok_per_s}")
    if not 0 <= spot_discount < 1:
        raise ValueError(f"--spot-discount must be in [0, 1), got {spot_discount}")
    per_row = np.asarray(prompt_tokens, dtype=np.float64) + output_ratio * np.asarray(max_tokens, dtype=np.float64)
    rows = len(per_row)
    work = float(per_row.sum())
    single = work / tok_per_s
    wpr = work / max(rows, 1)

    def margin_for(workers: int) -> tuple[int, float]:
        size = default_shard_size(rows, workers, wpr)
        return size, _slowest_shard(per_row, size) / tok_per_s

    def fits(workers: int) -> bool:
        return single / workers + margin_for(workers)[1] <= deadline_s

    # more workers: a smaller share each and smaller shards (a smaller margin), so fits() is monotone: bisect
    lo, hi = max(1, math.ceil(single / deadline_s)), max(1, rows)
    if not fits(hi):
        raise ValueError(f"the deadline ({deadline_s / 3600:.2f} h) is shorter than one shard's time "
                         f"({margin_for(hi)[1] / 3600:.2f} h at {tok_per_s:.1f} tok/s): no fleet can meet it")
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    workers = lo
    size, margin = margin_for(workers)
    makespan = min(single, single / workers + margin)
    cost = workers * hourly_rate * makespan / 3600
    return FleetPlan(rows, work, tok_per_s, output_ratio, single, deadline_s, workers, size,
                     math.ceil(rows / size) if rows else 0, margin, makespan, hourly_rate, spot_discount, cost,
                     cost * (1 - spot_discount), calibrated)


def calibrate(ctx, engine_options: dict, scanned, source, sample_rows: int = 64) -> tuple[float, float]:
    """Runs up to ``sample_rows`` valid rows (spread over the input) through an engine here; returns (tok/s of
    prompt + output tokens, share of max_tokens generated)."""
    import time

    from tokenmill.config import EngineConfig
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.engine.loop import EngineLoop
    from tokenmill.jobs.scan import iter_todo

    valid = np.flatnonzero(np.frombuffer(scanned.valid, dtype=np.uint8))
    if len(valid) == 0:
        raise ValueError("the input has no valid rows to calibrate on")
    pick = valid[np.linspace(0, len(valid) - 1, min(sample_rows, len(valid))).round().astype(int)]
    members = bytearray(len(scanned.valid))
    for n in pick:
        members[n] = 1
    plan = ctx.plan(*scanned.valid_lengths())
    engine = LLMEngine(EngineConfig.from_dict({"model": str(ctx.info.path),
                                               "max_num_seqs": plan.recommended_max_num_seqs,
                                               "max_num_batched_tokens": plan.recommended_max_num_batched_tokens,
                                               **engine_options}))
    items = list(iter_todo(source, members, set(), ctx.pre))
    t0 = time.perf_counter()
    tokens = generated = asked = 0
    loop = EngineLoop(engine)
    loop.open_feed("calibrate", (it.submission() for it in items), sort_by_length=engine.config.sort_by_length)
    for sub, out in loop.run():
        item = sub.payload
        tokens += out.num_prompt_tokens + out.num_generated_tokens
        generated += out.num_generated_tokens
        asked += item.max_tokens
    seconds = time.perf_counter() - t0
    return tokens / seconds, (generated / asked if asked else 1.0)
