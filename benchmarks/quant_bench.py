"""Quantization modes side by side (issue 15): ``python -m benchmarks.quant_bench --out DIR [--sections ...]``.

Sections:
- ``w``: workload W (128 chat prompts of 32-256 tokens, 128 output tokens, greedy, ignore_eos) through
  ``LLM.generate`` on SmolLM2 in each (dtype, quantization) setting, plus llama.cpp on the same GGUF and prompts
  (``benchmarks/llama_cpp_peer.py``, when ``make bench-peers`` installed it). Each setting runs in a fresh process,
  one after another, so resident memory is its own.
- ``eval``: ``tokenmill eval``'s figures for each setting: perplexity on the shipped text against float32, greedy
  agreement with float32.
- ``shapes``: random weights (``load_format="dummy"``) at Llama-3.2-1B and Llama-3.1-8B shapes
  (``benchmarks/shapes/``): resident memory after loading, its peak while loading, and generation speed on a small
  batch. The 8B model runs only in the modes that fit this machine; the others get their weight bytes computed.
- ``smoothquant``: the ablation behind w8a8's SmoothQuant (no smoothing, and several alphas).
- ``embed``: the embed harness's texts through all-MiniLM-L6-v2 in each setting, with each vector's cosine to
  float32's.

Writes ``quant.json`` and ``quant.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = Path(__file__).parent / "shapes"
W_SETTINGS = [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "w8a8"), ("float32", "w8a8"),
              ("bfloat16", "int8"), ("bfloat16", "int4"), ("float32", "int4")]
SHAPE_RUNS = {"llama-3.2-1b": [("bfloat16", "none"), ("bfloat16", "w8a8"), ("bfloat16", "int8"),
                               ("bfloat16", "int4")],
              "llama-3.1-8b": [("bfloat16", "int4"), ("bfloat16", "int8")]}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def run_one(spec: dict, ops=None) -> dict:
    """In a child process: load one setting, run its workload, report speed and memory. ``ops``: a kernel family to
    build the engine with (default: the engine's choice)."""
    import torch

    from benchmarks.workloads import workload_w
    from tokenmill import LLM, SamplingParams

    torch.ones(1)  # torch's own start-up memory belongs to the baseline
    base_kib = _status_kib("VmRSS")
    t0 = time.perf_counter()
    options = dict(dtype=spec["dtype"], quantization=spec["quantization"], kv_cache_memory=spec.get("kv_gib", 4.0),
                   kv_cache_dtype=spec.get("kv_cache_dtype", "auto"))
    if spec.get("shape"):
        options.update(load_format="dummy", max_model_len=spec["max_model_len"])
    llm = LLM(spec.get("model"), ops=ops, **options)
    load_s = time.perf_counter() - t0
    rss_gib = (_status_kib("VmRSS") - base_kib) / 2**20
    peak_gib = (_status_kib("VmHWM") - base_kib) / 2**20
    if spec.get("shape"):
        n, plen, olen = spec["prompts"], spec["prompt_len"], spec["output_len"]
        prompts = [[(97 * i + 13 * j) % 30000 + 100 for j in range(plen)] for i in range(n)]
        outputs = [olen] * n
    else:
        wl = workload_w(llm.tokenizer)
        prompts, outputs = wl.prompts, wl.output_lens
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outputs]
    if spec.get("warmup"):
        llm.generate(prompts[:2], [SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)] * 2,
                     use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    gen = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    return {**spec, "load_s": load_s, "weight_gib": llm.engine.weight_bytes / 2**30, "rss_after_load_gib": rss_gib,
            "peak_rss_load_gib": peak_gib, "wall_s": wall, "output_tokens": gen, "prompt_tokens": prompt_tokens,
            "output_tok_s": gen / wall, "total_tok_s": (gen + prompt_tokens) / wall,
            "greedy_first": outs[0].token_ids[:16]}


def child(spec: dict, timeout: int = 3600) -> dict:
    p = subprocess.run([sys.executable, "-m", "benchmarks.quant_bench", "--one", json.dumps(spec)],
                       capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def section_w(model: str | None, settings: list[tuple[str, ...]] = W_SETTINGS, peers: bool = True) -> list[dict]:
    """``settings``: (dtype, quantization) or (dtype, quantization, kv_cache_dtype)."""
    rows = []
    for dtype, q, *kv in settings:
        spec = {"model": model, "dtype": dtype, "quantization": q, "workload": "W"}
        if kv:
            spec["kv_cache_dtype"] = kv[0]
        r = child(spec)
        print(f"W {dtype} {q} {' '.join(kv)}: {r.get('output_tok_s', r.get('error'))}", flush=True)
        rows.append(r)
    if not peers:
        return rows
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        rows.append({"engine": "llama.cpp", "error": "llama-cpp-python not installed (make bench-peers)"})
        return rows
    from benchmarks.llama_cpp_peer import run_llama_cpp
    from benchmarks.workloads import workload_w
    from tokenmill.model.loader import load_tokenizer, read_model_config, resolve_model_path

    path = resolve_model_path(model)
    wl = workload_w(load_tokenizer(read_model_config(path)[0]))
    for n_parallel in (64, 128):
        r = run_llama_cpp(str(path), wl.prompts, wl.output_lens, n_parallel, os.cpu_count() or 2)
        rows.append({"engine": f"llama.cpp Q4_1 n_parallel={n_parallel}", **r})
        print(f"llama.cpp n_parallel={n_parallel}: {r.get('output_tok_s')}", flush=True)
    return rows


def section_eval(model: str | None) -> list[dict]:
    from tokenmill.eval import run_eval

    rows = []
    for dtype, q in W_SETTINGS[1:]:
        r = run_eval(model, {"dtype": dtype, "quantization": q}, None, 512, None, None, 32)
        rows.append(r)
        print(f"eval {r['setting']}: {100 * r['perplexity_change']:+.2f}%", flush=True)
    return rows


def section_shapes() -> list[dict]:
    from tokenmill.model.model_config import ModelConfig

    rows = []
    for shape, runs in SHAPE_RUNS.items():
        cfg = ModelConfig.from_hf_dict(json.loads((SHAPES / shape / "config.json").read_text()))
        params = cfg.num_parameters()
        big = shape.endswith("8b")
        for dtype, q in runs:
            spec = {"model": str(SHAPES / shape), "shape": shape, "dtype": dtype, "quantization": q,
                    "max_model_len": 512, "kv_gib": 1.0, "prompts": 8 if big else 32, "prompt_len": 32 if big else 64,
                    "output_len": 16 if big else 32, "warmup": True}
            r = child(spec)
            r["parameters"] = params
            print(f"{shape} {dtype} {q}: {r.get('output_tok_s', r.get('error'))} tok/s, "
                  f"rss {r.get('rss_after_load_gib')}", flush=True)
            rows.append(r)
        rows.append({"shape": shape, "parameters": params, "float32_weight_gib": params * 4 / 2**30,
                     "bfloat16_weight_gib": params * 2 / 2**30})
    return rows


def section_smoothquant(model: str | None) -> list[dict]:
    """The ablation behind w8a8's SmoothQuant: perplexity of the float32 model with its decoder layers' linears
    turned into w8a8 in place, with no smoothing and with the factors at several alphas (the LM head left float)."""
    from tokenmill import LLM
    from tokenmill.eval import DEFAULT_TEXT, perplexity
    from tokenmill.model import smoothquant
    from tokenmill.model.layers import Linear
    from tokenmill.model.quant import make_quantized_weight

    from tokenmill.model.loader import checkpoint_weights, read_model_config, resolve_model_path

    path = resolve_model_path(model)
    hf_dir, _ = read_model_config(path, with_weights=True)
    rows = []
    for alpha in (None, 0.3, 0.4, 0.5, 0.6, 0.7):
        llm = LLM(model, dtype="float32", kv_cache_memory=0.5, max_model_len=1024)
        net = llm.engine.runner.model
        ids = llm.tokenizer(DEFAULT_TEXT.read_text(), add_special_tokens=False).input_ids
        if alpha is None:
            ref = perplexity(llm.engine, ids, 512).perplexity
        else:  # the float checkpoint again, with the factors folded in as w8a8's loading does
            cal = llm.tokenizer(smoothquant.CALIBRATION_TEXT.read_text(), add_special_tokens=False).input_ids
            factors = smoothquant.smoothing_factors(net, smoothquant.input_absmax(net, cal), alpha)
            net.load_weights(smoothquant.smooth(checkpoint_weights(path, hf_dir, "none"), factors))
        for name, m in net.named_modules():
            if isinstance(m, Linear) and name.startswith("layers."):
                q = make_quantized_weight("w8a8", m.out_features, m.in_features, m.ops.kernels)
                q.load_rows(0, m.weight.data)
                q.finalize(m.dtype)
                m.quantized, m.weight = q, None
        p = perplexity(llm.engine, ids, 512).perplexity
        rows.append({"alpha": alpha, "perplexity": p, "float32": ref, "change": p / ref - 1})
        print(f"smoothquant alpha={alpha}: {100 * (p / ref - 1):+.2f}%", flush=True)
    return rows


def section_embed(num_texts: int = 3000) -> list[dict]:
    """The embed harness's texts through all-MiniLM-L6-v2 in each setting; cosine of each vector to float32's."""
    import numpy as np

    from benchmarks.embed_bench import make_texts
    from tokenmill.embed.embedder import Embedder

    texts = make_texts(num_texts)
    rows, ref = [], None
    for dtype, q in (("float32", "none"), ("bfloat16", "none"), ("float32", "w8a8"), ("bfloat16", "w8a8"),
                     ("bfloat16", "int8"), ("bfloat16", "int4")):
        emb = Embedder(dtype=dtype, quantization=q)
        emb.encode(texts[:16])  # warm-up
        t0 = time.perf_counter()
        vecs = emb.encode(texts)
        wall = time.perf_counter() - t0
        ref = vecs if ref is None else ref
        cos = (vecs * ref).sum(1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
        rows.append({"dtype": dtype, "quantization": q, "wall_s": wall, "texts_s": len(texts) / wall,
                     "min_cosine_vs_float32": float(cos.min()), "mean_cosine_vs_float32": float(cos.mean())})
        print(f"embed {dtype} {q}: {len(texts) / wall:.1f} texts/s, min cos {cos.min():.4f}", flush=True)
    return rows


def render(result: dict) -> str:
    lines = [f"# quantization ({result['machine']['cpu']}, {result['machine']['threads']} threads, commit "
             f"{result['machine']['commit']})", ""]
    if "w" in result:
        lines += ["## W", "", "| setting | output tok/s | total tok/s | wall (s) | weights (GiB) | RSS after load (GiB) |"
                  " peak RSS while loading (GiB) | load (s) |", "|---|---|---|---|---|---|---|---|"]
        for r in result["w"]:
            if "error" in r:
                lines.append(f"| {r.get('engine') or r['dtype'] + ' ' + r['quantization']} | {r['error']} |")
            elif "engine" in r:
                lines.append(f"| {r['engine']} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | {r['wall_s']:.1f} |"
                             " | | | |")
            else:
                lines.append(f"| {r['dtype']} {r['quantization']} | {r['output_tok_s']:.1f} | {r['total_tok_s']:.1f} | "
                             f"{r['wall_s']:.1f} | {r['weight_gib']:.3f} | {r['rss_after_load_gib']:.2f} | "
                             f"{r['peak_rss_load_gib']:.2f} | {r['load_s']:.1f} |")
        lines.append("")
    if "eval" in result:
        lines += ["## eval", "", "| setting | perplexity | float32 | change | greedy identical | tokens before first "
                  "divergence |", "|---|---|---|---|---|---|"]
        for r in result["eval"]:
            a = r["agreement"]
            lines.append(f"| {r['setting']} | {r['perplexity']:.3f} | {r['reference']['perplexity']:.3f} | "
                         f"{100 * r['perplexity_change']:+.2f}% | {a['identical']}/{a['prompts']} | "
                         f"{100 * a['prefix_share']:.1f}% |")
        lines.append("")
    if "shapes" in result:
        lines += ["## shapes (random weights)", "", "| shape | setting | weights (GiB) | RSS after load (GiB) | "
                  "peak RSS while loading (GiB) | load (s) | output tok/s | total tok/s |", "|---|---|---|---|---|---|---|---|"]
        for r in result["shapes"]:
            if "float32_weight_gib" in r:
                lines.append(f"| {r['shape']} | float32 / bfloat16 (computed) | {r['float32_weight_gib']:.2f} / "
                             f"{r['bfloat16_weight_gib']:.2f} | | | | | |")
            elif "error" in r:
                lines.append(f"| {r['shape']} | {r['dtype']} {r['quantization']} | {r['error']} |")
            else:
                lines.append(f"| {r['shape']} | {r['dtype']} {r['quantization']} | {r['weight_gib']:.2f} | "
                             f"{r['rss_after_load_gib']:.2f} | {r['peak_rss_load_gib']:.2f} | {r['load_s']:.1f} | "
                             f"{r['output_tok_s']:.2f} | {r['total_tok_s']:.1f} |")
        lines.append("")
    if "smoothquant" in result:
        lines += ["## SmoothQuant ablation (float32 activations, LM head float)", "", "| alpha | perplexity | change |",
                  "|---|---|---|"]
        for r in result["smoothquant"]:
            lines.append(f"| {'none' if r['alpha'] is None else r['alpha']} | {r['perplexity']:.3f} | "
                         f"{100 * r['change']:+.2f}% |")
        lines.append("")
    if "embed" in result:
        lines += ["## embed (all-MiniLM-L6-v2)", "", "| setting | texts/s | vs float32 | min cosine to float32 | "
                  "mean cosine |", "|---|---|---|---|---|"]
        base = result["embed"][0]["texts_s"]
        for r in result["embed"]:
            lines.append(f"| {r['dtype']} {r['quantization']} | {r['texts_s']:.1f} | {r['texts_s'] / base:.2f}x | "
                         f"{r['min_cosine_vs_float32']:.5f} | {r['mean_cosine_vs_float32']:.5f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help="GGUF or HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--sections", default="w,eval,shapes,smoothquant,embed")
    ap.add_argument("--w-settings", default=None, metavar="DTYPE:QUANT[:KV_CACHE_DTYPE],...",
                    help="only these W settings, and no llama.cpp (e.g. bfloat16:none,bfloat16:w8a8,bfloat16:none:fp8)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return
    from benchmarks.__main__ import machine_info

    result: dict = {"machine": machine_info()}
    sections = args.sections.split(",")
    if "w" in sections:
        if args.w_settings:
            chosen = [tuple(x.split(":")) for x in args.w_settings.split(",")]
            result["w"] = section_w(args.model, chosen, peers=False)
        else:
            result["w"] = section_w(args.model)
    if "eval" in sections:
        result["eval"] = section_eval(args.model)
    if "shapes" in sections:
        result["shapes"] = section_shapes()
    if "smoothquant" in sections:
        result["smoothquant"] = section_smoothquant(args.model)
    if "embed" in sections:
        result["embed"] = section_embed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps(result, indent=1))
    (out / "quant.md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
