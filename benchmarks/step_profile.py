"""Where an engine step's time goes, by kind of work: GEMMs, attention, the K/V write, norms / RoPE / activation, the
LM head, sampling, building the step's inputs, the scheduler, and the rest (Python).

    python benchmarks/step_profile.py '{"dtype": "bfloat16"}' [NUM_SEQS] [--prefill] [--prompt-len LO,HI]

Adds NUM_SEQS W-like requests (prompts of LO-HI random tokens, 32-256 by default; 128 requests by default), steps
until every prompt is
prefilled (timed as the prefill phase with --prefill), then times 10 decode steps. Each kind is timed exclusively
(a GEMM inside the attention wrapper counts as a GEMM) by wrapping the ops object's methods, the linear layers, the
LM head and the sampler of this engine; the wrappers cost a few microseconds per call, which lands in "rest".
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections import defaultdict

from tokenmill import LLM, SamplingParams


class Timer:
    """Exclusive time per kind: a call's time minus the time of the wrapped calls inside it."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []  # time of the wrapped calls inside each open call

    def wrap(self, kind: str, fn):
        def timed(*a, **k):
            self._stack.append(0.0)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t
                inner = self._stack.pop()
                self.spent[kind] += dt - inner
                self.calls[kind] += 1
                if self._stack:
                    self._stack[-1] += dt

        return timed

    def reset(self) -> None:
        self.spent.clear()
        self.calls.clear()


class _KernelProxy:
    """The C++ module with write_kv timed (the attention backend calls it before attending)."""

    def __init__(self, kernels, timer: Timer) -> None:
        self._k = kernels
        self.write_kv = timer.wrap("K/V write", kernels.write_kv)

    def __getattr__(self, name):
        return getattr(self._k, name)


def instrument(eng, timer: Timer) -> None:
    from tokenmill.model.layers import Embedding, Linear

    ops = eng.ops
    for name in ("rms_norm", "rope", "silu_mul"):
        setattr(ops, name, timer.wrap("norm/rope/act", getattr(ops, name)))
    ops.argmax = timer.wrap("sampling", ops.argmax)
    att = ops.attention
    if hasattr(att, "kernels"):
        att.kernels = _KernelProxy(att.kernels, timer)
    att.forward = timer.wrap("attention", att.forward)  # the runner's backend is this object
    for m in eng.runner.model.modules():
        if isinstance(m, Linear):
            for meth in ("forward", "forward_gated", "forward_add", "forward_act"):
                setattr(m, meth, timer.wrap("GEMMs", getattr(m, meth)))
        elif isinstance(m, Embedding):
            m.forward = timer.wrap("embedding", m.forward)
    model = eng.runner.model
    model.compute_logits = timer.wrap("LM head", model.compute_logits)
    model.greedy_tokens = timer.wrap("LM head", model.greedy_tokens)  # the fused greedy head, where it runs
    eng.runner.sampler = timer.wrap("sampling", eng.runner.sampler)
    eng.runner.buffers.fill = timer.wrap("step inputs", eng.runner.buffers.fill)
    for name in ("schedule", "update_from_output"):
        setattr(eng.scheduler, name, timer.wrap("scheduler", getattr(eng.scheduler, name)))


def report(label: str, timer: Timer, wall: float, steps: int) -> dict:
    parts = {k: round(1000 * v / steps, 2) for k, v in sorted(timer.spent.items(), key=lambda kv: -kv[1])}
    parts["rest (Python)"] = round(1000 * (wall - sum(timer.spent.values())) / steps, 2)
    return {"phase": label, "steps": steps, "step_ms": round(1000 * wall / steps, 2), "ms_per_step": parts}


def main() -> None:
    argv = sys.argv[1:]
    lo, hi = 32, 256
    if "--prompt-len" in argv:
        i = argv.index("--prompt-len")
        lo, hi = map(int, argv[i + 1].split(","))
        del argv[i:i + 2]
    args = [a for a in argv if not a.startswith("--")]
    options = json.loads(args[0]) if args else {}
    num_seqs = int(args[1]) if len(args) > 1 else 128
    eng = LLM(**options).engine
    timer = Timer()
    instrument(eng, timer)
    rng = random.Random(0)
    for i in range(num_seqs):
        ids = [rng.randrange(100, 40000) for _ in range(rng.randint(lo, hi))]
        eng.add_request(str(i), ids, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    out = {"options": options, "num_seqs": num_seqs}
    t, steps = time.perf_counter(), 0
    while any(r.is_prefilling for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
        steps += 1
    if "--prefill" in sys.argv:
        out["prefill"] = report("prefill", timer, time.perf_counter() - t, steps)
    for _ in range(2):  # warm-up decode steps
        eng.step()
    timer.reset()
    t = time.perf_counter()
    for _ in range(10):
        eng.step()
    out["decode"] = report("decode", timer, time.perf_counter() - t, 10)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
