"""Scoring throughput: the log-probability of every prompt token of workload W's prompts (SmolLM2, float32 or
``--dtype bfloat16`` on both sides),
tokenmill (``LLMEngine.score_batch``: the machinery of ``tokenmill run --task score``) against transformers
computing the same log-probabilities in right-padded batches (its best batch size of a ladder), side by side,
alternating, in one process; and tokenmill's rate as a share of this machine's GEMM roofline in that dtype (the
best 1024^3 GEMM rate measured in the rounds).

    python benchmarks/score_bench.py [--num-prompts 128] [--hf-batch-sizes 8,16,32] [--rounds 2] [--dtype bfloat16]

Scoring is pure prefill plus the LM head on every token, so its FLOPs are 2 x (non-embedding parameters + the LM
head) per token plus causal attention.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import gemm_rate, load_hf_model, machine_info  # noqa: E402
from benchmarks.workloads import workload_w  # noqa: E402


def score_flops(mc, prompts: list[list[int]]) -> float:
    h, layers = mc.hidden_size, mc.num_hidden_layers
    stack = 2 * (mc.num_parameters() - mc.vocab_size * h * (1 if mc.tie_word_embeddings else 2) - h)
    head = 2 * mc.vocab_size * h
    attn = 4 * layers * mc.num_attention_heads * mc.head_dim
    return sum((stack + head) * len(p) + attn * len(p) * (len(p) + 1) / 2 for p in prompts)


@torch.inference_mode()
def hf_scores(model, prompts: list[list[int]], batch_size: int) -> list[list[float]]:
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for r, p in enumerate(batch):
            ids[r, :len(p)] = torch.tensor(p)
            mask[r, :len(p)] = 1
        lp = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), dim=-1)  # [b, width, vocab]
        got = lp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
        out += [got[r, :len(p) - 1].tolist() for r, p in enumerate(batch)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--hf-batch-sizes", default="8,16,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    from tokenmill import LLM

    llm = LLM(dtype=args.dtype)
    wl = workload_w(llm.tokenizer, num_prompts=args.num_prompts)
    prompts = wl.prompts
    tokens = sum(len(p) for p in prompts)
    hf = load_hf_model(None, args.dtype)
    sizes = [int(x) for x in args.hf_batch_sizes.split(",")]
    best: dict[str, float] = {}
    ours = ref = None
    roofs = []
    for _ in range(args.rounds):  # alternate; the GEMM rate is measured in every round (the host is noisy)
        roofs.append(gemm_rate(getattr(torch, args.dtype), seconds=1.0) * 1e9)
        t0 = time.perf_counter()
        ours = llm.engine.score_batch(prompts)
        best["tokenmill"] = min(best.get("tokenmill", 1e9), time.perf_counter() - t0)
        for bs in sizes:
            t0 = time.perf_counter()
            ref = hf_scores(hf, prompts, bs)
            best[f"hf bs={bs}"] = min(best.get(f"hf bs={bs}", 1e9), time.perf_counter() - t0)
    diff = max(abs(a - b) for x, y in zip(ours, ref) for a, b in zip(x, y))
    flops = score_flops(llm.engine.model_config, prompts)
    roof = max(roofs)
    hf_best = min(v for k, v in best.items() if k.startswith("hf"))
    result = {"machine": machine_info(), "dtype": args.dtype, "prompts": len(prompts), "tokens": tokens,
              "tok_s": {k: round(tokens / v, 1) for k, v in best.items()},
              "tokenmill_over_hf_best": round(hf_best / best["tokenmill"], 2),
              "tokenmill_roofline_share": round(flops / best["tokenmill"] / roof, 3),
              "gemm_gflops": [round(r / 1e9, 1) for r in roofs], "max_abs_logprob_diff": diff}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
