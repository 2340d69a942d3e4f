"""OpenVINO GenAI as a peer: its continuous-batching pipeline on a workload given as token ids.

Runs in the peers' own virtual environment (``make bench-cpu-peers`` makes it under ``build/peers/venv``), never in
the project's: the harness (``benchmarks/cpu_peers.py``) starts it as a subprocess and reads one JSON object from its
last stdout line. The model is an OpenVINO IR exported by ``optimum-cli export openvino`` (float32 weights for the
float tiers, int8 / int4 weights for those tiers); the precision hint (f32 / bf16) and the KV-cache precision are CPU
plugin properties, the token budget and the sequence cap are the scheduler's.

    build/peers/venv/bin/python benchmarks/openvino_peer.py --model DIR --workload wl.json --threads 2 \
        --precision bf16 --kv u8 --budget 2048 --max-seqs 256
"""

from __future__ import annotations

import argparse
import json
import time


def run(model: str, prompts: list[list[int]], output_lens: list[int], threads: int, precision: str, kv: str,
        budget: int, max_seqs: int, cache_gb: float, dyn_quant: int | None) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as g

    sc = g.SchedulerConfig()
    sc.max_num_batched_tokens = budget
    sc.max_num_seqs = max_seqs
    sc.cache_size = max(1, int(round(cache_gb)))
    sc.dynamic_split_fuse = True
    sc.enable_prefix_caching = False
    props = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision, "KV_CACHE_PRECISION": kv}
    if dyn_quant is not None:  # 0: weights only; N: activations quantized to int8 in groups of N on the fly
        props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = dyn_quant
    t0 = time.perf_counter()
    pipe = g.ContinuousBatchingPipeline(model, sc, "CPU", props)
    load_s = time.perf_counter() - t0
    configs = []
    for n in output_lens:
        c = g.GenerationConfig()
        c.max_new_tokens = n
        c.min_new_tokens = n
        c.ignore_eos = True
        c.do_sample = False
        configs.append(c)
    ids = [ov.Tensor(np.asarray([p], dtype=np.int64)) for p in prompts]
    t0 = time.perf_counter()
    results = pipe.generate(ids, configs)
    wall = time.perf_counter() - t0
    out_tokens = [list(r.m_generation_ids[0]) for r in results]
    generated = sum(len(t) for t in out_tokens)
    prompt_tokens = sum(len(p) for p in prompts)
    return {"engine": f"OpenVINO GenAI {g.__version__.split('-')[0]} ({precision}, KV {kv}, budget {budget})",
            "wall_s": wall, "load_s": load_s, "prompt_tokens": prompt_tokens, "output_tokens": generated,
            "output_tok_s": generated / wall, "total_tok_s": (prompt_tokens + generated) / wall,
            "precision": precision, "kv": kv, "budget": budget, "max_seqs": max_seqs, "dyn_quant": dyn_quant,
            "first_tokens": [t[:16] for t in out_tokens]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="OpenVINO IR directory (optimum-cli export openvino)")
    ap.add_argument("--workload", required=True, help='JSON {"prompts": [[ids]], "output_lens": [n]}')
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--kv", default="u8", choices=["u8", "u4", "f16", "bf16", "f32"])
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens")
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--cache-gb", type=float, default=2.0)
    ap.add_argument("--dyn-quant", type=int, default=None,
                    help="DYNAMIC_QUANTIZATION_GROUP_SIZE (0 = off); default: the plugin's own")
    args = ap.parse_args()
    wl = json.loads(open(args.workload).read())
    print(json.dumps(run(args.model, wl["prompts"], wl["output_lens"], args.threads, args.precision, args.kv,
                         args.budget, args.max_seqs, args.cache_gb, args.dyn_quant)))


if __name__ == "__main__":
    main()
