"""The cost of LoRA adapters per row: workload W on the base model alone against the same rows spread over 4
adapters (rank 16 on q/k/v/o/gate/up/down), alternating in one process (SmolLM2 by default).

    python benchmarks/lora_bench.py [--num-prompts 64] [--output-len 64] [--rounds 2] [--dtype float32]
                                    [--adapters 4] [--rank 16] [--quantization int8] [--out benchmarks/runs]
                                    [--model DIR --load-format dummy]  # e.g. moe_bench.py's MoE config

The adapters are written here in PEFT's layout (adapter_config.json + adapter_model.safetensors, random factors
of the model's shapes); on a mixture of experts the sparse layers' experts are adapted instead of a dense MLP, in
PEFT's target_parameters layout over the fused expert parameters. Reported: total tok/s of the base run and of the
mixed run (rows round-robin over the adapters, so every step holds all of them: the grouped low-rank updates' worst
case), their best-vs-best ratio and each round's ratio (this host's speed drifts between rounds); the issue's target
is a cost of at most 25%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import machine_info  # noqa: E402
from benchmarks.workloads import workload_w  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(out: Path, mc, rank: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    h, d = mc.hidden_size, mc.head_dim
    shapes = {"q_proj": (mc.num_attention_heads * d, h), "k_proj": (mc.num_key_value_heads * d, h),
              "v_proj": (mc.num_key_value_heads * d, h), "o_proj": (h, mc.num_attention_heads * d),
              "gate_proj": (mc.intermediate_size, h), "up_proj": (mc.intermediate_size, h),
              "down_proj": (h, mc.intermediate_size)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    e, i = mc.num_experts, mc.moe_intermediate_size
    for layer in range(mc.num_hidden_layers):
        sparse = layer in mc.moe_layers
        if sparse:  # PEFT's nesting: gate_up_proj's wrapper inside, down_proj's outside
            for key, n_in, n_out in ((".base_layer", h, 2 * i), ("", i, h)):
                key = f"base_model.model.model.layers.{layer}.mlp.experts{key}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank * e, n_in, generator=g) * 0.01
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank * e, generator=g) * 0.01
        for t in TARGETS[:4] if sparse else TARGETS:
            n_out, n_in = shapes[t]
            part = "self_attn" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if mc.moe_layers else None
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                         "target_modules": list(TARGETS), "bias": "none",
                                                         "target_parameters": experts}))


def run(llm, wl, loras: list[str | None]) -> dict:
    from tokenmill import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, lora=loras[i % len(loras)])
              for i, n in enumerate(wl.output_lens)]
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    gen = sum(len(o.token_ids) for o in outs)
    return {"wall_s": round(wall, 2), "total_tok_s": round((wl.prompt_tokens + gen) / wall, 1),
            "output_tok_s": round(gen / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--load-format", default="auto", help="dummy: random weights (a config-only --model directory)")
    ap.add_argument("--quantization", default="none", help="the base model's weights (none, int8, int4, w8a8, ...)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from tokenmill import LLM

    base = LLM(args.model, dtype=args.dtype, kv_cache_memory=2.0, load_format=args.load_format)
    mc = base.engine.model_config
    del base
    root = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    names = [f"a{i}" for i in range(args.adapters)]
    for i, n in enumerate(names):
        write_adapter(root / n, mc, args.rank, seed=i)
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=2.0, load_format=args.load_format,
              quantization=args.quantization, lora_adapters={n: str(root / n) for n in names})
    wl = workload_w(llm.engine.tokenizer, num_prompts=args.num_prompts, output_len=args.output_len)
    from benchmarks.workloads import Workload

    warm = Workload("warmup", wl.prompts[:16], [8] * len(wl.prompts[:16]))
    for loras in ([None], names):  # the first steps of each kind build their GEMM primitives: not measured
        run(llm, warm, loras)
    runs = []
    for r in range(args.rounds):
        for mode in ("base", "mixed") if r % 2 == 0 else ("mixed", "base"):
            res = run(llm, wl, [None] if mode == "base" else names) | {"mode": mode, "round": r}
            runs.append(res)
            print(json.dumps(res), flush=True)
    best = {m: max(x["total_tok_s"] for x in runs if x["mode"] == m) for m in ("base", "mixed")}
    pairs = [round(m["total_tok_s"] / b["total_tok_s"], 3) for r in range(args.rounds)
             for m in runs if m["round"] == r and m["mode"] == "mixed" for b in runs if b["round"] == r
             and b["mode"] == "base"]
    report = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "best_total_tok_s": best,
              "mixed_over_base": round(best["mixed"] / best["base"], 3), "per_round_mixed_over_base": pairs,
              "runs": runs}
    print(json.dumps({k: report[k] for k in ("best_total_tok_s", "mixed_over_base", "per_round_mixed_over_base")}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"lora-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
