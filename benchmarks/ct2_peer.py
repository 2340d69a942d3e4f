"""CTranslate2 as a peer: ``Generator.generate_batch`` on a workload given as token ids.

Runs in the peers' own virtual environment (``make bench-cpu-peers``), started by ``benchmarks/cpu_peers.py`` as a
subprocess; prints one JSON object on its last stdout line. The model is a CTranslate2 directory converted by
``ct2-transformers-converter`` in float32; the compute type (float32 / int8 / int8_float32 / int16, and bfloat16
where the build supports it on CPU) is chosen when loading, as CTranslate2 intends. CTranslate2 takes tokens as
vocabulary strings: the ids map through the converted model's own ``vocabulary.json``, so no tokenizer runs.

``generate_batch`` sorts the inputs by length and runs them in static batches of ``max_batch_size`` examples;
``include_prompt_in_result=False`` forwards each batch's prompts at once (its fast path for long inputs). Greedy
(``sampling_topk=1``), exactly ``output_len`` new tokens: ``min_length`` = ``max_length`` and no end token.

    build/peers/venv/bin/python benchmarks/ct2_peer.py --model DIR --workload wl.json --threads 2 \
        --compute-type int8 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import time


def run(model: str, prompts: list[list[int]], output_lens: list[int], threads: int, compute_type: str,
        batch_size: int) -> dict:
    import ctranslate2

    vocab = json.loads(open(os.path.join(model, "vocabulary.json")).read())
    index = {t: i for i, t in enumerate(vocab)}
    t0 = time.perf_counter()
    gen = ctranslate2.Generator(model, device="cpu", compute_type=compute_type, inter_threads=1,
                                intra_threads=threads)
    load_s = time.perf_counter() - t0
    if len(set(output_lens)) != 1:
        raise SystemExit("ct2_peer: one output length per workload (generate_batch takes one max_length)")
    n = output_lens[0]
    tokens = [[vocab[i] for i in p] for p in prompts]
    t0 = time.perf_counter()
    results = gen.generate_batch(tokens, max_batch_size=batch_size, batch_type="examples", sampling_topk=1,
                                 max_length=n, min_length=n, end_token=[], include_prompt_in_result=False)
    wall = time.perf_counter() - t0
    out = [[index[t] for t in r.sequences[0]] for r in results]
    generated = sum(len(t) for t in out)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"engine": f"CTranslate2 {ctranslate2.__version__} ({compute_type}, batch {batch_size})", "wall_s": wall,
            "load_s": load_s, "prompt_tokens": prompt_tokens, "output_tokens": generated,
            "output_tok_s": generated / wall, "total_tok_s": (prompt_tokens + generated) / wall,
            "compute_type": compute_type, "batch_size": batch_size, "first_tokens": [t[:16] for t in out]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="CTranslate2 model directory (ct2-transformers-converter)")
    ap.add_argument("--workload", required=True, help='JSON {"prompts": [[ids]], "output_lens": [n]}')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compute-type", default="float32")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    wl = json.loads(open(args.workload).read())
    print(json.dumps(run(args.model, wl["prompts"], wl["output_lens"], args.threads, args.compute_type,
                         args.batch_size)))


if __name__ == "__main__":
    main()
