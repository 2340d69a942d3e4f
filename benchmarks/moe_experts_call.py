"""One MoE layer's experts in one C++ call against the same experts driven from Python (issue 32), side by side.

    python benchmarks/moe_experts_call.py --quantization int8 [--experts 64 --expert-size 512 --top-k 8 --hidden 1024]

Builds a one-layer Mixtral-shaped model with dummy weights (config only), then times its SparseMoE layer on 32 and 256
tokens with the one-call path (``moe_experts`` / ``moe_experts_w8a8`` / ``moe_experts_panels``, by quantization) and
with the Python loop over the experts' Linears, alternating, best of ``--rounds``; asserts the two are bit-equal.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantization", default="int8", help="none, w8a8, int8 or int4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-size", type=int, default=2048)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import torch

    from tokenmill import LLM

    root = Path(tempfile.mkdtemp(prefix="moe-call-"))
    cfg = {"vocab_size": 49152, "hidden_size": args.hidden, "num_hidden_layers": 1, "num_attention_heads": 16,
           "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "intermediate_size": args.expert_size,
           "num_local_experts": args.experts, "num_experts_per_tok": args.top_k}
    (root / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(root), load_format="dummy", dtype=args.dtype, kv_cache_memory=0.5, max_model_len=512,
              quantization=args.quantization)
    moe = llm.engine.runner.model.layers[0].mlp
    flags = ("one_call", "w8a8_call", "panels_call")
    on = {f: getattr(moe, f) for f in flags}
    if not any(on.values()):
        raise SystemExit("no one-call path for these experts here (they loop in Python either way)")

    def python_loop(x):
        for f in flags:
            setattr(moe, f, False)
        try:
            return moe(x, x)
        finally:
            for f, v in on.items():
                setattr(moe, f, v)

    dtype = getattr(torch, args.dtype)
    for n in (32, 256):
        x = torch.randn(n, args.hidden, generator=torch.Generator().manual_seed(n)).to(dtype)
        assert torch.equal(moe(x, x), python_loop(x)), "the one call and the Python loop differ"
        times = {"one call": [], "python loop": []}
        for _ in range(args.rounds):
            for name, fn in (("one call", lambda: moe(x, x)), ("python loop", lambda: python_loop(x))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        print(f"{args.quantization} {args.experts}x{args.expert_size} top-{args.top_k} hidden {args.hidden}, "
              f"{n} tokens: " + ", ".join(f"{k} {1000 * min(v):.2f} ms" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
