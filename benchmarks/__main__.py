"""The benchmark harness: ``python -m benchmarks [--quick] [--model PATH] [--sections ...] [--out DIR]``.

Runs named sections in one process, so peers are measured side by side on the same machine state, and writes a JSON
result (machine, torch version, threads, commit, every figure) and a markdown table to ``--out``.

Sections:
- ``w``: workload W through tokenmill and through transformers ``generate`` with static batches (left padding).
- ``scheduler``: the mixed workload under prefill_first, continuous without chunked prefill, continuous with it.
- ``sweep``: throughput against max_num_seqs and max_num_batched_tokens (table and PNG plot).
- ``scale``: throughput as the dataset grows (SmolLM2 at 100 requests; a tiny random-weight Llama for 100 to 10,000,
  because SmolLM2 would take hours at the top size on this CPU).
- ``roofline``: this machine's GEMM rate (fp32, bf16) and each result as a percentage of the fp32 GEMM roofline.
- ``embed``: ``tokenmill`` embeddings (all-MiniLM-L6-v2) against sentence-transformers ``encode`` (its default batch
  size and others) on a few thousand mixed-length texts, plus index build time per 100,000 vectors
  (``benchmarks/embed_bench.py``).
- ``peers`` (not in the default list: ~1 hour): OpenVINO GenAI and CTranslate2 against tokenmill at each precision
  tier, on W and a long-prompt workload (``benchmarks/cpu_peers.py``; ``make bench-cpu-peers`` installs the peers).

Peers in ``w``: transformers ``generate`` with static batches (left padding), transformers continuous batching
(``generate_batch``) when the installed version has it, and llama.cpp (``make bench-peers``) on the same GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from benchmarks.workloads import Workload, workload_mixed, workload_w


def machine_info() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M")}


# ---------------------------------------------------------------- engines
def run_tokenmill(llm, wl: Workload, label: str) -> dict:
    from tokenmill import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in wl.output_lens]
    before = llm.engine.stats.num_steps, llm.engine.stats.sum_running, llm.engine.stats.num_underfilled_steps
    t0 = time.perf_counter()
    outs = llm.generate(wl.prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    st = llm.engine.stats
    steps = st.num_steps - before[0]
    gen = sum(len(o.token_ids) for o in outs)
    return {"engine": label, "wall_s": wall, "prompt_tokens": wl.prompt_tokens, "output_tokens": gen,
            "output_tok_s": gen / wall, "total_tok_s": (wl.prompt_tokens + gen) / wall, "steps": steps,
            "avg_batch": (st.sum_running - before[1]) / max(1, steps),
            "underfilled_steps": st.num_underfilled_steps - before[2]}


def load_hf_model(model: str | None, dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    from tokenmill.model.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    dtype=getattr(torch, dtype)).eval()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


@torch.inference_mode()
def run_hf_static(hf_model, wl: Workload, batch_size: int, pad_id: int, dtype: str = "float32") -> dict:
    """transformers generate over static batches in input order, left-padded, exactly output_len new tokens."""
    out_len = max(wl.output_lens)
    padded = real = 0
    t0 = time.perf_counter()
    for i in range(0, len(wl.prompts), batch_size):
        batch = wl.prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        padded += width * len(batch)
        real += sum(len(p) for p in batch)
        hf_model.generate(ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                          pad_token_id=pad_id)
    wall = time.perf_counter() - t0
    gen = out_len * len(wl.prompts)
    return {"engine": f"transformers static {dtype} bs={batch_size}", "wall_s": wall, "prompt_tokens": wl.prompt_tokens,
            "output_tokens": gen, "output_tok_s": gen / wall, "total_tok_s": (wl.prompt_tokens + gen) / wall,
            "prompt_padding_fraction": 1 - real / padded}


def run_hf_continuous(hf_model, wl: Workload) -> dict | None:
    """transformers' own continuous batching (generate_batch), when the installed version has it."""
    if not hasattr(hf_model, "generate_batch"):
        return None
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(wl.output_lens), do_sample=False, eos_token_id=-1,
                           pad_token_id=0)
    t0 = time.perf_counter()
    try:
        outs = hf_model.generate_batch(wl.prompts, generation_config=cfg)
    except Exception as e:  # an experimental API: report why it did not run instead of failing the harness
        return {"engine": "transformers generate_batch", "wall_s": float("nan"), "prompt_tokens": wl.prompt_tokens,
                "output_tokens": 0, "output_tok_s": float("nan"), "total_tok_s": float("nan"),
                "error": f"{type(e).__name__}: {str(e)[:120]}"}
    wall = time.perf_counter() - t0
    gen = sum(len(o.generated_tokens) for o in outs.values())
    if gen < sum(wl.output_lens):
        return {"engine": "transformers generate_batch", "wall_s": wall, "prompt_tokens": wl.prompt_tokens,
                "output_tokens": gen, "output_tok_s": float("nan"), "total_tok_s": float("nan"),
                "error": f"generated {gen} of {sum(wl.output_lens)} tokens (requests failed)"}
    return {"engine": "transformers generate_batch", "wall_s": wall, "prompt_tokens": wl.prompt_tokens,
            "output_tokens": gen, "output_tok_s": gen / wall, "total_tok_s": (wl.prompt_tokens + gen) / wall}


def run_llama_cpp_rows(gguf_path: str, wl: Workload, parallel: list[int]) -> list[dict]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return []
    from benchmarks.llama_cpp_peer import run_llama_cpp

    return [run_llama_cpp(gguf_path, wl.prompts, wl.output_lens, n, torch.get_num_threads()) for n in parallel]


def run_sweep(model: str | None, wl: Workload, seqs: list[int], budgets: list[int], out_png: Path) -> list[dict]:
    from tokenmill import LLM

    rows = []
    for budget in budgets:
        for n in seqs:
            r = run_tokenmill(LLM(model, max_num_seqs=n, max_num_batched_tokens=budget), wl,
                              f"max_num_seqs={n} budget={budget}")
            r.update(max_num_seqs=n, max_num_batched_tokens=budget)
            rows.append(r)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for budget in budgets:
        pts = [(r["max_num_seqs"], r["total_tok_s"]) for r in rows if r["max_num_batched_tokens"] == budget]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"max_num_batched_tokens={budget}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max_num_seqs")
    ax.set_ylabel("total tokens/s")
    ax.set_title(f"tokenmill throughput sweep ({len(wl.prompts)} requests)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return rows


def run_scale(model: str | None, tiny_model: str, sizes: list[int], smollm2_size: int, output_len: int,
              max_len: int) -> list[dict]:
    from tokenmill import LLM

    rows = []
    llm = LLM(model)
    wl = workload_w(llm.tokenizer, num_prompts=smollm2_size, min_len=8, max_len=max_len, output_len=output_len,
                    seed=7)
    r = run_tokenmill(llm, wl, f"{llm.engine.model_path.name} x {smollm2_size}")
    r["requests"] = smollm2_size
    rows.append(r)
    tiny = LLM(tiny_model)
    for n in sizes:
        wl = workload_w(tiny.tokenizer, num_prompts=n, min_len=8, max_len=64, output_len=output_len, seed=7)
        r = run_tokenmill(tiny, wl, f"tiny random Llama x {n}")
        r["requests"] = n
        rows.append(r)
    return rows


# ---------------------------------------------------------------- roofline
def gemm_rate(dtype: torch.dtype, m: int = 1024, k: int = 1024, n: int = 1024, seconds: float = 2.0,
              backend: str | None = None) -> float:
    """Sustained GFLOP/s of [m, k] x [n, k]^T in ``dtype`` through ``model/gemm.linear`` (the path the model layers
    take: the weight packed for the backend) with the given CPU GEMM backend ("onednn", "panels" or "aten"; None: the
    engine's default, "auto")."""
    from tokenmill.model import gemm

    name = gemm.check_backend(backend or "auto")
    a, b = torch.randn(m, k, dtype=dtype), gemm.pack(torch.randn(n, k, dtype=dtype), name)
    for _ in range(3):
        gemm.linear(a, b, None, name)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        gemm.linear(a, b, None, name)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9


# GEMM shapes of the benchmarked models: (what, M, K, N)
MODEL_GEMMS = [("SmolLM2 decode gate_up, 128 seqs", 128, 576, 3072), ("SmolLM2 decode down, 128 seqs", 128, 1536, 576),
               ("SmolLM2 LM head, 128 seqs", 128, 576, 49152), ("SmolLM2 prefill qkv, 512 tokens", 512, 576, 960),
               ("MiniLM intermediate, 2048 tokens", 2048, 384, 1536), ("MiniLM output, 2048 tokens", 2048, 1536, 384)]


def workload_flops(mc, wl: Workload) -> float:
    """2 x (non-embedding parameters) per token through the stack, the LM head only for sampled tokens,
    plus attention (QK^T and PV: 4 x layers x heads x head_dim per visible key)."""
    h, layers = mc.hidden_size, mc.num_hidden_layers
    per_token = 2 * (mc.num_parameters() - mc.vocab_size * h * (1 if mc.tie_word_embeddings else 2) - h)
    lm_head = 2 * mc.vocab_size * h
    attn_per_key = 4 * layers * mc.num_attention_heads * mc.head_dim
    total = 0.0
    for p, o in zip(wl.prompts, wl.output_lens):
        n_tokens = len(p) + o
        total += per_token * n_tokens + lm_head * o
        total += attn_per_key * (n_tokens * (n_tokens + 1) / 2)  # token i sees i keys (causal)
    return total


# ---------------------------------------------------------------- report
def markdown(result: dict) -> str:
    lines = [f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch "
             f"{result['machine']['torch']}, {result['machine']['threads']} threads; commit "
             f"`{result['machine']['commit']}`; {result['machine']['date']}", ""]
    for section in ("w", "scheduler", "sweep", "scale"):
        rows = result.get(section)
        if not rows:
            continue
        lines += [f"### {section}", "",
                  "| engine | wall s | output tok/s | total tok/s | extra |", "|---|---|---|---|---|"]
        for r in rows:
            extra = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                              if k not in ("engine", "wall_s", "output_tok_s", "total_tok_s", "prompt_tokens",
                                           "output_tokens"))
            lines.append(f"| {r['engine']} | {r['wall_s']:.1f} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | "
                         f"{extra} |")
        lines.append("")
    if "roofline" in result:
        rl = result["roofline"]
        lines += ["### roofline", "", f"GEMM rate (1024^3): fp32 {rl['gemm_gflops_fp32']:.1f} GFLOP/s (aten/MKL "
                  f"{rl.get('gemm_gflops_fp32_aten', 0):.1f}, oneDNN {rl.get('gemm_gflops_fp32_onednn', 0):.1f}, "
                  f"panels {rl.get('gemm_gflops_fp32_panels', 0):.1f}), "
                  f"bf16 {rl['gemm_gflops_bf16']:.1f} GFLOP/s; W needs {rl['w_flops'] / 1e12:.2f} TFLOP, a floor of "
                  f"{rl['w_floor_s_fp32']:.1f} s in fp32 and {rl['w_floor_s_bf16']:.1f} s in bf16.", ""]
        if rl.get("model_gemms"):
            lines += ["| GEMM (M x K x N) | fp32 aten/MKL | fp32 oneDNN | bf16 |", "|---|---|---|---|"]
            for g in rl["model_gemms"]:
                lines.append(f"| {g['what']} ({g['m']} x {g['k']} x {g['n']}) | {g['fp32_aten']:.0f} | "
                             f"{g['fp32_onednn']:.0f} | {g['bf16']:.0f} |")
            lines.append("")
        for r in result.get("w", []):
            if r.get("dtype") == "bfloat16":
                lines.append(f"- {r['engine']}: {100 * rl['w_floor_s_bf16'] / r['wall_s']:.1f}% of the bf16 roofline")
            else:
                lines.append(f"- {r['engine']}: {100 * rl['w_floor_s_fp32'] / r['wall_s']:.1f}% of the fp32 roofline"
                             + (" (its own Q4_1 x int8 kernels)" if "llama.cpp" in r["engine"] else ""))
        lines.append("")
    if result.get("sweep_plot"):
        lines += [f"Sweep plot: `{result['sweep_plot']}`", ""]
    if "embed" in result:
        from benchmarks.embed_bench import markdown as embed_markdown

        lines += embed_markdown(result["embed"])
    if "peers" in result:
        from benchmarks.cpu_peers import markdown as peers_markdown

        lines += ["### peers", "", peers_markdown(result["peers"])]
    for note in result.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--sections", default="w,scheduler,sweep,scale,roofline,embed")
    ap.add_argument("--hf-batch-sizes", default="16,64,128")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="dtypes for tokenmill and transformers in section w (llama.cpp runs its GGUF weights)")
    ap.add_argument("--kv-cache-dtypes", default="auto",
                    help="tokenmill's KV-cache dtypes in section w (auto,fp8: each dtype's row with either cache)")
    ap.add_argument("--quick", action="store_true", help="tiny workloads: a smoke run, not a measurement")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    dtypes = args.dtypes.split(",")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    from tokenmill import LLM

    t0 = time.perf_counter()
    llm = LLM(args.model)
    result: dict = {"machine": machine_info(), "load_s": time.perf_counter() - t0, "quick": args.quick, "notes": []}
    tok = llm.tokenizer
    if args.quick:
        w = workload_w(tok, num_prompts=6, min_len=8, max_len=40, output_len=6)
        mixed = workload_mixed(tok, num_prompts=8, prompt_range=(4, 40), output_range=(2, 12))
        batch_sizes = [4]
    else:
        w = workload_w(tok)
        mixed = workload_mixed(tok)
        batch_sizes = [int(b) for b in args.hf_batch_sizes.split(",")]
    result["workloads"] = {wl.name: {"requests": len(wl.prompts), "prompt_tokens": wl.prompt_tokens,
                                     "output_tokens": wl.output_tokens} for wl in (w, mixed)}

    if "w" in sections:
        default_dt = str(llm.engine.dtype).removeprefix("torch.")
        rows = [{**run_tokenmill(llm, w, f"tokenmill ({default_dt}, default; continuous + chunked)"),
                 "dtype": default_dt}]
        for dt in dtypes:
            if dt != default_dt:
                rows.append({**run_tokenmill(LLM(args.model, dtype=dt), w, f"tokenmill ({dt}; continuous + chunked)"),
                             "dtype": dt})
        for kv in args.kv_cache_dtypes.split(","):
            if kv != "auto":
                rows += [{**run_tokenmill(LLM(args.model, dtype=dt, kv_cache_dtype=kv), w,
                                          f"tokenmill ({dt}, KV {kv}; continuous + chunked)"), "dtype": dt}
                         for dt in dtypes]
        cb = None
        hf_rows = []
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        for dt in dtypes:
            hf = load_hf_model(args.model, dt)
            # float32: every batch size; other dtypes: the larger ones, where static batching does best
            sizes = batch_sizes if dt == "float32" else batch_sizes[-2:]
            hf_rows += [{**run_hf_static(hf, w, bs, pad, dt), "dtype": dt} for bs in sizes]
            if dt == "float32":
                cb = run_hf_continuous(hf, w)
            del hf
        best = max(hf_rows, key=lambda r: r["total_tok_s"])
        tm_rows = list(rows)
        rows += hf_rows
        if cb is not None:
            rows.append(cb)
        path = str(llm.engine.model_path)
        best_lc = None
        if path.endswith(".gguf"):
            lc_rows = run_llama_cpp_rows(path, w, [4] if args.quick else [64, 128])
            if lc_rows:
                rows += lc_rows
                best_lc = max(lc_rows, key=lambda r: r["total_tok_s"])
            else:
                result["notes"].append("llama.cpp peer skipped: llama-cpp-python is not installed (make bench-peers)")
        for r in tm_rows:
            r["vs_best_transformers_static"] = r["total_tok_s"] / best["total_tok_s"]
            if best_lc is not None:
                r["vs_best_llama_cpp"] = r["total_tok_s"] / best_lc["total_tok_s"]
        result["w"] = rows
    if "scheduler" in sections:
        mml = min(1024, llm.engine.model_config.max_position_embeddings)
        configs = [
            ("prefill_first", {"scheduling_strategy": "prefill_first", "max_model_len": mml,
                               "max_num_batched_tokens": mml}),
            ("continuous, no chunked prefill", {"enable_chunked_prefill": False, "max_model_len": mml,
                                                "max_num_batched_tokens": mml}),
            ("continuous + chunked prefill", {"max_model_len": mml, "max_num_batched_tokens": mml}),
        ]
        rows = []
        for label, opts in configs:
            rows.append(run_tokenmill(LLM(args.model, max_num_seqs=64, **opts), mixed, label))
        for r in rows:
            r["vs_prefill_first"] = r["total_tok_s"] / rows[0]["total_tok_s"]
        result["scheduler"] = rows
    if "sweep" in sections:
        sweep_wl = workload_w(tok, num_prompts=8 if args.quick else 32, min_len=32, max_len=128 if not args.quick else 40,
                              output_len=6 if args.quick else 64, seed=3)
        seqs = [1, 4] if args.quick else [1, 4, 16, 32, 64, 128, 256]
        budgets = [64] if args.quick else [512, 2048]
        png = out_dir / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}.png"
        result["sweep"] = run_sweep(args.model, sweep_wl, seqs, budgets, png)
        result["sweep_plot"] = str(png)
    if "scale" in sections:
        import tempfile
        import sys as _sys

        _sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers import save_tiny_model

        with tempfile.TemporaryDirectory() as d:
            save_tiny_model("llama", Path(d))
            sizes = [10, 40] if args.quick else [100, 1000, 10000]
            result["scale"] = run_scale(args.model, d, sizes, 4 if args.quick else 100, 4 if args.quick else 32,
                                        40 if args.quick else 256)
    if "roofline" in sections:
        flops = workload_flops(llm.engine.model_config, w)
        secs = 0.2 if args.quick else 2.0
        # the roofline is the faster of the two fp32 paths: the best this machine does, not only what tokenmill uses
        from tokenmill.model import gemm

        rate32_aten = gemm_rate(torch.float32, seconds=secs, backend="aten")
        rate32_onednn = gemm_rate(torch.float32, seconds=secs, backend="onednn")
        # tokenmill's own float GEMM where it runs (AVX2-only CPUs), else 0
        rate32_panels = gemm_rate(torch.float32, seconds=secs, backend="panels") if gemm.panels_available() else 0.0
        rate32 = max(rate32_aten, rate32_onednn, rate32_panels)
        rate16 = gemm_rate(torch.bfloat16, seconds=secs)
        shapes = [{"what": what, "m": m, "k": k, "n": n,
                   "fp32_aten": gemm_rate(torch.float32, m, k, n, secs / 4, "aten"),
                   "fp32_onednn": gemm_rate(torch.float32, m, k, n, secs / 4, "onednn"),
                   "bf16": gemm_rate(torch.bfloat16, m, k, n, secs / 4)} for what, m, k, n in MODEL_GEMMS]
        result["roofline"] = {"gemm_gflops_fp32": rate32, "gemm_gflops_fp32_aten": rate32_aten,
                              "gemm_gflops_fp32_onednn": rate32_onednn, "gemm_gflops_fp32_panels": rate32_panels,
                              "gemm_gflops_bf16": rate16,
                              "model_gemms": shapes, "w_flops": flops,
                              "w_floor_s_fp32": flops / (rate32 * 1e9), "w_floor_s_bf16": flops / (rate16 * 1e9)}

    if "embed" in sections:
        from benchmarks.embed_bench import run_embed_section

        result["embed"] = run_embed_section(args.quick)
    if "peers" in sections:
        from benchmarks import cpu_peers

        result["peers"] = cpu_peers.run_section(args.model, tok, ["w", "long"], list(cpu_peers.TIERS),
                                                1 if args.quick else 2, args.quick)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out_dir / f"bench-{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
