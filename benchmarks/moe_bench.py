"""A mixture of experts against a dense model of the same total size (dummy weights), on a W-like workload.

    python benchmarks/moe_bench.py [--num-prompts 32] [--output-len 64] [--rounds 2] [--dtype float32]
                                   [--quantization none|w8a8|int8|int4]
                                   [--out benchmarks/runs]

Two config-only model directories are written: a Mixtral-style MoE (8 experts of intermediate size I, top-2) and a
Llama with one MLP of 8 x I, the same attention, vocabulary and depth, so both hold the same parameters and the MoE
spends about a quarter of the MLP's FLOPs per token (seed 003's lever). Both run W's prompts (chat-templated,
32..256 tokens, greedy, ``--output-len`` tokens, EOS ignored) in alternating rounds in one process; reported: total
tok/s of each, the speedup, the ratio of the workload's linear FLOPs (every token through the decoder, the LM head
for the sampled ones) and the share of it the speedup reaches. A layer-level split times one MoE layer against the dense MLP (same total) and a dense MLP of
the active size (top_k x I: the grouped GEMM's ideal) at a prefill-sized and a decode-sized batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.__main__ import machine_info, run_tokenmill  # noqa: E402
from benchmarks.workloads import workload_w  # noqa: E402


def configs(args) -> dict[str, dict]:
    common = {"vocab_size": 49152, "hidden_size": args.hidden, "num_hidden_layers": args.layers,
              "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    return {
        "moe": {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "intermediate_size": args.expert_size, "num_local_experts": args.experts,
                "num_experts_per_tok": args.top_k},
        "dense": {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                  "intermediate_size": args.experts * args.expert_size},
    }


def linear_flops(mc) -> tuple[int, int]:
    """(decoder FLOPs every token spends: 2 x the active decoder linear weights; the LM head's, spent only by a token
    whose next token is sampled)."""
    decoder = sum(o * i * (c // mc.num_experts * mc.num_experts_per_tok if n.startswith("expert_") else c)
                  for n, o, i, c in mc.linear_shapes())
    return 2 * decoder, 2 * mc.vocab_size * mc.hidden_size


def workload_flops(mc, wl) -> int:
    """Linear FLOPs of the whole workload: every prompt and output token through the decoder, the LM head for each
    output token (attention's own FLOPs left out: equal for both models)."""
    decoder, head = linear_flops(mc)
    return decoder * (wl.prompt_tokens + wl.output_tokens) + head * wl.output_tokens


def layer_split(llms: dict, dtype, rounds: int = 5, quantization: str = "none") -> list[dict]:
    """Milliseconds of one layer's MLP part: the MoE layer, the same layer with its experts driven from Python (not
    in one C++ call), the dense MLP of the same total, and a dense MLP of the active size built from the MoE's first
    top_k experts' shapes (what a perfect grouped GEMM would cost)."""
    import torch

    from tokenmill.model.layers import MLP, Build
    from tokenmill.model.weights import init_dummy_weights

    moe_model, dense_model = llms["moe"].engine.runner.model, llms["dense"].engine.runner.model
    moe = moe_model.layers[0].mlp
    dense = dense_model.layers[0].mlp
    cfg = moe_model.config
    active = MLP(cfg.hidden_size, cfg.num_experts_per_tok * cfg.moe_intermediate_size,
                 Build(moe_model.ops, moe_model.embed_tokens.weight.dtype, quantization=quantization))
    init_dummy_weights(active)  # quantized weights are final after their dummy codes
    if quantization == "none":
        for lin in (active.gate_up_proj, active.down_proj):
            lin.finalize()

    def python_loop():
        calls = moe.one_call, moe.w8a8_call, moe.panels_call
        moe.one_call = moe.w8a8_call = moe.panels_call = False
        try:
            return moe(x, x)
        finally:
            moe.one_call, moe.w8a8_call, moe.panels_call = calls

    out = []
    for n in (256, 32):
        x = torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(n)).to(dtype)
        fns = {"moe_layer_ms": lambda: moe(x, x), "moe_layer_python_loop_ms": python_loop,
               "dense_same_total_ms": lambda: dense(x, x), "dense_active_size_ms": lambda: active(x, x)}
        times = {name: [] for name in fns}
        for fn in fns.values():
            fn()  # warm-up (oneDNN primitives for new shapes)
        for _ in range(rounds):  # alternating: a change in the machine's load touches every variant alike
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        out.append({"tokens": n} | {name: round(1000 * min(t), 3) for name, t in times.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--quantization", default="none", help="both models' (none, w8a8, int8, int4)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--expert-size", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from tokenmill import LLM

    root = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    llms = {}
    for name, cfg in configs(args).items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(cfg))
        llms[name] = LLM(str(root / name), load_format="dummy", dtype=args.dtype, kv_cache_memory=2.0,
                         max_model_len=512, quantization=args.quantization)
    wl = workload_w(llms["dense"].engine.tokenizer, num_prompts=args.num_prompts, output_len=args.output_len)
    mcs = {n: llm.engine.model_config for n, llm in llms.items()}
    params = {n: {"total": mc.num_parameters(), "active": mc.num_parameters(active=True),
                  "decoder_flops_per_token": linear_flops(mc)[0], "workload_gflops": workload_flops(mc, wl) / 1e9}
              for n, mc in mcs.items()}
    print(json.dumps(params), flush=True)
    runs = []
    for r in range(args.rounds):
        for name in ("moe", "dense") if r % 2 == 0 else ("dense", "moe"):
            res = run_tokenmill(llms[name], wl, name)
            res["round"] = r
            runs.append(res)
            print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
    best = {n: max(x["total_tok_s"] for x in runs if x["engine"] == n) for n in llms}
    speedup = best["moe"] / best["dense"]
    flop_ratio = params["dense"]["workload_gflops"] / params["moe"]["workload_gflops"]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    report = {"machine": machine_info(), "args": vars(args) | {"out": str(args.out)}, "parameters": params,
              "best_total_tok_s": {n: round(v, 1) for n, v in best.items()}, "speedup": round(speedup, 3),
              "flop_ratio": round(flop_ratio, 3), "share_of_flop_ratio": round(speedup / flop_ratio, 3),
              "layer_split": layer_split(llms, dtype, quantization=args.quantization), "runs": runs}
    print(json.dumps({k: report[k] for k in ("best_total_tok_s", "speedup", "flop_ratio", "share_of_flop_ratio",
                                             "layer_split")}))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"moe-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
