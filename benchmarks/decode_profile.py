"""Where a decode step's time goes: W-like running sequences on SmolLM2, step time and attention time.

    python benchmarks/decode_profile.py '{"dtype": "float32"}' [NUM_SEQS]   # any LLM(...) options as JSON; 128 seqs

Adds NUM_SEQS requests (prompts of 32-256 random tokens), steps until every prompt is prefilled, then times 10 decode
steps, with the attention backend wrapped to time it separately.
"""

from __future__ import annotations

import json
import random
import sys
import time

from tokenmill import LLM, SamplingParams


def main() -> None:
    options = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    num_seqs = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    eng = LLM(**options).engine
    rng = random.Random(0)
    for i in range(num_seqs):
        ids = [rng.randrange(100, 40000) for _ in range(rng.randint(32, 256))]
        eng.add_request(str(i), ids, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    while any(r.is_prefilling for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    backend = eng.runner.backend
    inner = backend.forward
    spent = [0.0]

    def timed(*a, **k):
        t = time.perf_counter()
        out = inner(*a, **k)
        spent[0] += time.perf_counter() - t
        return out

    backend.forward = timed
    t = time.perf_counter()
    for _ in range(10):
        eng.step()
    step = (time.perf_counter() - t) / 10
    print(json.dumps({"options": options, "num_seqs": num_seqs, "step_ms": round(1000 * step, 1),
                      "attention_ms": round(100 * spent[0], 1)}))


if __name__ == "__main__":
    main()
