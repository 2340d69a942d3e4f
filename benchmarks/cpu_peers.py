"""tokenmill against the strongest CPU engines, side by side: OpenVINO GenAI and CTranslate2 (issue 28).

    make bench-cpu-peers                               # once: the peers' venv and the exported models (build/peers/)
    python -m benchmarks.cpu_peers --out benchmarks/results [--workloads w,long] [--tiers ...] [--rounds 2]
                                   [--ct2-batch-sizes 16,32]

Also the ``peers`` section of ``python -m benchmarks``. Every engine gets the same prompts as token ids, the same greedy
tokens with EOS ignored (128 for W, 64 for the long-prompt workload) and the same threads; runs alternate engine by
engine within a round, so a change in the machine's background load touches every engine alike. Load / compile time is
reported apart from the generation wall time.

Tiers (a precision tier is what the weights and the GEMMs run in):

| tier | tokenmill | OpenVINO GenAI (continuous batching) | CTranslate2 (``generate_batch``) |
|---|---|---|---|
| float32 | float32 | fp32 IR, precision hint f32 | float32 |
| bfloat16 | bfloat16 (or bf16 weights, float32 activations) | fp32 IR, precision hint bf16 | bfloat16 where its CPU build has it |
| int8 | int8 weights, bf16 activations | int8 IR, no dynamic activation quantization | int8_bfloat16 where built |
| int4 | int4 weights, bf16 activations | int4 IR, no dynamic activation quantization | (none) |
| w8a8 | w8a8 | int8 IR, activations quantized on the fly | int8 / int8_float32 |

Best mode: each engine's settings are searched on the workload at its tier (tokenmill: the KV-cache dtype, the
model's or fp8; OpenVINO: the token budget and the KV-cache precision; CTranslate2: the batch size), one pass over the
grid in the first round, and the best setting is the one that runs in the later rounds. The figure kept for an engine
is its best round. On a host without bfloat16 GEMMs (AVX2 only: oneDNN has no bf16 kernels there) tokenmill's quantized
tiers also try float32 activations, its bfloat16 tier float32 activations over the bf16 weights
(``activation_dtype="float32"``, as OpenVINO's bf16 hint runs there), and OpenVINO's KV precision f32 instead of bf16
(which it refuses there). A peer
that is not installed is reported as missing, never silently dropped. The host's CPU model, ISA (AVX2 / AVX-512 /
AMX) and GEMM rates measured in the same run head the report.

The peers live in their own virtual environment (``build/peers/venv``: optimum-intel, openvino-genai, ctranslate2 and
their torch), never in the project's ``.venv``; ``benchmarks/openvino_peer.py`` and ``benchmarks/ct2_peer.py`` run
there as subprocesses and print one JSON object each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.host_facts import gemm_rates, host_info

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "build" / "peers"
PEER_PYTHON = PEERS / "venv" / "bin" / "python"
MODELS = PEERS / "models"
TIERS = ("float32", "bfloat16", "int8", "int4", "w8a8")
CT2_BATCH_SIZES = (16, 32)  # 64 and 128 were slower on W (BENCHMARKS.md)


# ---------------------------------------------------------------- workloads
def workloads(tokenizer, names: list[str], quick: bool) -> dict:
    from benchmarks.workloads import workload_w

    out = {}
    if "w" in names:
        out["W"] = (workload_w(tokenizer, num_prompts=6, min_len=8, max_len=40, output_len=6) if quick
                    else workload_w(tokenizer))
    if "long" in names:
        out["long"] = (workload_w(tokenizer, num_prompts=3, min_len=64, max_len=96, output_len=4, seed=5) if quick
                       else workload_w(tokenizer, num_prompts=24, min_len=1024, max_len=2048, output_len=64, seed=5))
    return out


# ---------------------------------------------------------------- models for the peers
def peer_python() -> Path | None:
    return PEER_PYTHON if PEER_PYTHON.exists() else None


def _run_peer(args: list[str], timeout: float = 3600) -> dict:
    proc = subprocess.run([str(PEER_PYTHON), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return json.loads(lines[-1])


def hf_float_dir(model: str | None) -> Path:
    """The model as an HF directory with float32 safetensors, which the peers' converters read: an HF directory is
    used as it is; a GGUF file is dequantized once (transformers' GGUF reader) into build/peers/models/."""
    from tokenmill.model.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.suffix != ".gguf":
        return path
    out = MODELS / f"{path.stem}-hf"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tmp = Path(tempfile.mkdtemp(dir=MODELS.parent if MODELS.parent.exists() else None, prefix=".hf-"))
    tied = hf.config.tie_word_embeddings
    save_file({k: v.contiguous() for k, v in hf.state_dict().items() if not (tied and k == "lm_head.weight")},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights written are plain float32
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def peer_models(hf_dir: Path) -> dict[str, Path]:
    """Exports (once, kept under build/peers/models/) with the peers' own tools in their venv: OpenVINO IR in fp32,
    int8 and int4 weights (optimum-cli export openvino; int4 in asymmetric groups of 32 along K, tokenmill's int4 form,
    its embeddings and LM head int8 as optimum does by default), and the CTranslate2 model in float32."""
    out = {}
    bin_dir = PEER_PYTHON.parent
    for fmt in ("fp32", "int8", "int4"):
        d = MODELS / f"{hf_dir.name}-ov-{fmt}"
        if not (d / "openvino_model.xml").exists():
            subprocess.run([str(bin_dir / "optimum-cli"), "export", "openvino", "--model", str(hf_dir), "--task",
                            "text-generation-with-past", "--weight-format", fmt,
                            *(["--group-size", "32"] if fmt == "int4" else []), str(d)], check=True,
                           capture_output=True)
        out[f"ov-{fmt}"] = d
    d = MODELS / f"{hf_dir.name}-ct2"
    if not (d / "model.bin").exists():
        subprocess.run([str(bin_dir / "ct2-transformers-converter"), "--model", str(hf_dir), "--output_dir", str(d),
                        "--quantization", "float32", "--force"], check=True, capture_output=True)
    out["ct2"] = d
    return out


def prepare(model: str | None) -> dict[str, Path]:
    """``make bench-cpu-peers``'s second half: the float HF directory and the peers' exports."""
    if peer_python() is None:
        raise SystemExit(f"no peers' venv at {PEER_PYTHON}: run `make bench-cpu-peers`")
    return peer_models(hf_float_dir(model))


# ---------------------------------------------------------------- contenders
@dataclass
class Contender:
    """One engine at one tier; ``grid`` holds the settings searched in the first round (best kept for the rest)."""

    tier: str
    engine: str  # tokenmill | openvino | ct2
    grid: list[dict]
    best: dict | None = None
    results: list[dict] = field(default_factory=list)
    missing: str | None = None  # why this peer did not run


def contenders(tiers: list[str], models: dict[str, Path] | None, quick: bool,
               ct2_sizes: list[int] | None = None, skip_ct2: bool = False) -> list[Contender]:
    ct2_types = _ct2_compute_types() if models else set()
    budgets = [2048] if quick else [512, 2048]  # 4096 was never better (BENCHMARKS.md)
    bf16_host = _bf16_gemms()
    out = []
    for tier in tiers:
        tm = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
              "int8": {"dtype": "bfloat16", "quantization": "int8"},
              "int4": {"dtype": "bfloat16", "quantization": "int4"},
              "w8a8": {"dtype": "bfloat16", "quantization": "w8a8"}}[tier]
        kv_dtypes = ["auto"] if quick else ["auto", "fp8"]  # like OpenVINO's KV precision: both searched
        # without bf16 GEMMs a bf16 activation costs a widening per linear: float32 activations are searched too
        # (a bfloat16 model's with its weights kept bfloat16: activation_dtype="float32", as OpenVINO's bf16 hint runs)
        acts = [tm] + ([tm | {"dtype": "float32"}] if "quantization" in tm and not bf16_host and not quick else [])
        acts += [tm | {"activation_dtype": "float32"}] if tier == "bfloat16" and not bf16_host and not quick else []
        out.append(Contender(tier, "tokenmill", [a if kv == "auto" else a | {"kv_cache_dtype": kv}
                                                 for a in acts for kv in kv_dtypes]))
        if models is None:
            out.append(Contender(tier, "openvino", [], missing="peers not installed or not asked for"))
            out.append(Contender(tier, "ct2", [], missing="peers not installed or not asked for"))
            continue
        ir, precision, dyn = {"float32": ("ov-fp32", "f32", 0), "bfloat16": ("ov-fp32", "bf16", 0),
                              "int8": ("ov-int8", "bf16", 0), "int4": ("ov-int4", "bf16", 0),
                              "w8a8": ("ov-int8", "bf16", 32)}[tier]
        kvs = ["u8"] if quick else (["u8", "f32"] if tier == "float32" or not bf16_host else ["u8", "bf16"])
        out.append(Contender(tier, "openvino", [{"model": str(models[ir]), "precision": precision, "kv": kv,
                                                  "budget": b, "dyn_quant": dyn} for kv in kvs for b in budgets]))
        ct2_type = {"float32": "float32", "bfloat16": "bfloat16", "int8": "int8_bfloat16", "int4": None,
                    "w8a8": "int8_float32"}[tier]
        if skip_ct2:
            out.append(Contender(tier, "ct2", [], missing="skipped (--skip-ct2)"))
        elif ct2_type is None:
            out.append(Contender(tier, "ct2", [], missing="CTranslate2 has no 4-bit weights"))
        elif ct2_type not in ct2_types:
            out.append(Contender(tier, "ct2", [], missing=f"this CTranslate2 build has no {ct2_type} on CPU "
                                                         f"(it has {', '.join(sorted(ct2_types))})"))
        else:
            sizes = [4] if quick else list(ct2_sizes or CT2_BATCH_SIZES)
            types = [ct2_type] + (["int8"] if tier == "w8a8" and "int8" in ct2_types else [])
            out.append(Contender(tier, "ct2", [{"model": str(models["ct2"]), "compute_type": t, "batch_size": s}
                                               for t in types for s in sizes]))
    return out


def _bf16_gemms() -> bool:
    """Whether this host runs bfloat16 GEMMs natively (oneDNN's bf16 kernels: AVX-512 BW/VL/DQ or AMX)."""
    import torch

    from tokenmill.model import gemm

    return torch.bfloat16 in gemm._ONEDNN_DTYPES


def _ct2_compute_types() -> set[str]:
    proc = subprocess.run([str(PEER_PYTHON), "-c", "import ctranslate2, json; "
                           "print(json.dumps(sorted(ctranslate2.get_supported_compute_types('cpu'))))"],
                          capture_output=True, text=True)
    return set(json.loads(proc.stdout)) if proc.returncode == 0 else set()


def run_setting(c: Contender, setting: dict, model: str | None, wl, wl_file: Path, threads: int) -> dict:
    if c.engine == "tokenmill":
        return run_tokenmill(model, wl, setting, threads)
    if c.engine == "openvino":
        return _run_peer(["benchmarks/openvino_peer.py", "--model", setting["model"], "--workload", str(wl_file),
                          "--threads", str(threads), "--precision", setting["precision"], "--kv", setting["kv"],
                          "--budget", str(setting["budget"]), "--dyn-quant", str(setting["dyn_quant"])])
    return _run_peer(["benchmarks/ct2_peer.py", "--model", setting["model"], "--workload", str(wl_file),
                      "--threads", str(threads), "--compute-type", setting["compute_type"],
                      "--batch-size", str(setting["batch_size"])])


def run_tokenmill(model: str | None, wl, setting: dict, threads: int) -> dict:
    """In a child process, like the peers (its memory and threads are its own)."""
    spec = {"model": model, "prompts": wl.prompts, "output_lens": wl.output_lens, "threads": threads, **setting}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.cpu_peers", "--tokenmill-child", f.name],
                              capture_output=True, text=True, cwd=ROOT, timeout=3600)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or [''])[-1][:300]}"}
    return json.loads(lines[-1])


def tokenmill_child(spec_file: str) -> None:
    import torch

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["threads"])
    from tokenmill import LLM, SamplingParams

    options = {k: spec[k] for k in ("dtype", "activation_dtype", "quantization", "kv_cache_dtype",
                                    "max_num_batched_tokens") if k in spec}
    t0 = time.perf_counter()
    llm = LLM(spec["model"], num_threads=spec["threads"], **options)
    load_s = time.perf_counter() - t0
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in spec["output_lens"]]
    t0 = time.perf_counter()
    outs = llm.generate(spec["prompts"], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    gen = sum(len(o.token_ids) for o in outs)
    prompt_tokens = sum(len(p) for p in spec["prompts"])
    activations = llm.engine.info.activation_dtype  # set where it is not the model's dtype
    label = (spec["dtype"] + (f" ({str(activations).removeprefix('torch.')} activations)" if activations else "")
             + (f", {spec['quantization']}" if spec.get("quantization") else "")
             + (f", KV {spec['kv_cache_dtype']}" if spec.get("kv_cache_dtype") else ""))
    print(json.dumps({"engine": f"tokenmill ({label})", "wall_s": wall, "load_s": load_s,
                      "prompt_tokens": prompt_tokens, "output_tokens": gen, "output_tok_s": gen / wall,
                      "total_tok_s": (prompt_tokens + gen) / wall,
                      "first_tokens": [list(o.token_ids[:16]) for o in outs]}))


# ---------------------------------------------------------------- the run
def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of rows whose first tokens match exactly (a sanity check that both engines ran the same model and
    prompts; different GEMM orders make long greedy runs diverge now and then, so it is reported, not required)."""
    return sum(x[:16] == y[:16] for x, y in zip(a, b)) / max(1, len(a))


def run_section(model: str | None, tokenizer, workload_names: list[str], tiers: list[str], rounds: int, quick: bool,
                threads: int = 2, peers: bool = True, ct2_sizes: list[int] | None = None,
                skip_ct2: bool = False) -> dict:
    """The side-by-side runs; ``peers=False`` runs tokenmill alone (the harness's own smoke test); ``ct2_sizes``:
    CTranslate2's batch sizes to search (default 16 and 32); ``skip_ct2``: OpenVINO alone beside tokenmill."""
    models = None
    notes = []
    if not peers:
        notes.append("peers not run (--no-peers)")
    elif peer_python() is None:
        notes.append(f"peers missing: no {PEER_PYTHON} (make bench-cpu-peers)")
    else:
        models = prepare(model)
    result = {"host": host_info(), "threads": threads, "notes": notes, "workloads": {}}
    for name, wl in workloads(tokenizer, workload_names, quick).items():
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"prompts": wl.prompts, "output_lens": wl.output_lens}, f)
        wl_file = Path(f.name)
        cs = contenders(tiers, models, quick, ct2_sizes, skip_ct2)
        try:
            for r in range(rounds):
                for c in cs:
                    if c.missing:
                        continue
                    settings = c.grid if r == 0 else [c.best]
                    for s in settings:
                        res = run_setting(c, s, model, wl, wl_file, threads)
                        res.update(tier=c.tier, family=c.engine, setting=s, round=r)
                        c.results.append(res)
                        print(f"[{name} r{r}] {c.tier:9s} {res.get('engine', c.engine)}: "
                              f"{res.get('total_tok_s', float('nan')):.1f} tok/s {res.get('error', '')}",
                              file=sys.stderr, flush=True)
                    ok = [x for x in c.results if "error" not in x]
                    if r == 0 and ok:
                        c.best = max(ok, key=lambda x: x["total_tok_s"])["setting"]
        finally:
            wl_file.unlink()
        result["workloads"][name] = {"requests": len(wl.prompts), "prompt_tokens": wl.prompt_tokens,
                                     "output_tokens": wl.output_tokens, "rows": _summarise(cs)}
    result["gemm_gflops"] = gemm_rates(0.2 if quick else 2.0)
    return result


def _summarise(cs: list[Contender]) -> list[dict]:
    rows = []
    for c in cs:
        ok = [x for x in c.results if "error" not in x]
        if c.missing or not ok:
            err = c.missing or "; ".join(sorted({x["error"] for x in c.results})) or "did not run"
            rows.append({"tier": c.tier, "family": c.engine, "missing": err})
            continue
        best = max(ok, key=lambda x: x["total_tok_s"])
        at_best = [x["total_tok_s"] for x in ok if x["setting"] == best["setting"]]
        rows.append({**best, "rounds_at_best": at_best,
                     "searched": [{"setting": x["setting"], "total_tok_s": x["total_tok_s"]}
                                  for x in ok if x["round"] == 0]})
    by_tier: dict[str, dict] = {}
    for r in rows:
        by_tier.setdefault(r["tier"], {})[r["family"]] = r
    for tier, fams in by_tier.items():
        tm = fams.get("tokenmill")
        for fam, r in fams.items():
            if fam != "tokenmill" and tm and "missing" not in r and "missing" not in tm:
                tm[f"vs_{fam}"] = tm["total_tok_s"] / r["total_tok_s"]
                tm[f"agreement_{fam}"] = agreement(tm["first_tokens"], r["first_tokens"])
    return rows


def markdown(result: dict) -> str:
    h = result["host"]
    rates = result.get("gemm_gflops", {})
    lines = [f"Host: {h['cpu']} ({', '.join(h['isa'])}), {h['cores']} cores, {result['threads']} threads per engine; "
             f"torch {h['torch']}; commit `{h['commit']}`; {h['date']}. GEMM rates measured in this run (1024^3): "
             + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items()), ""]
    for note in result.get("notes", []):
        lines.append(f"Note: {note}")
    for name, w in result["workloads"].items():
        lines += [f"### {name}: {w['requests']} requests, {w['prompt_tokens']} prompt + {w['output_tokens']} output "
                  "tokens", "", "| tier | engine | best setting | total tok/s (best round) | rounds at best | "
                  "tokenmill / this | rows with tokenmill's first 16 tokens |", "|---|---|---|---|---|---|---|"]
        rows = w["rows"]
        tm_by_tier = {r["tier"]: r for r in rows if r["family"] == "tokenmill" and "missing" not in r}
        for r in rows:
            if "missing" in r:
                lines.append(f"| {r['tier']} | {r['family']} | not run: {r['missing']} | | | | |")
                continue
            setting = ", ".join(f"{k}={v}" for k, v in r["setting"].items() if k != "model")
            tm = tm_by_tier.get(r["tier"])
            other = tm is not None and r["family"] != "tokenmill"
            ratio = f"{tm['total_tok_s'] / r['total_tok_s']:.2f}" if other else ""
            agree = f"{agreement(tm['first_tokens'], r['first_tokens']):.0%}" if other else ""
            lines.append(f"| {r['tier']} | {r['engine']} | {setting} | {r['total_tok_s']:.1f} | "
                         f"{', '.join(f'{x:.0f}' for x in r['rounds_at_best'])} | {ratio} | {agree} |")
        best = {}
        for r in rows:
            if "missing" not in r and (r["family"] not in best or r["total_tok_s"] > best[r["family"]]["total_tok_s"]):
                best[r["family"]] = r
        if "tokenmill" in best:
            tm = best["tokenmill"]
            lines += ["", "Best against best: " + "; ".join(
                f"{r['engine']} {r['total_tok_s']:.1f} tok/s" for r in best.values())
                + "; " + ", ".join(f"tokenmill / {fam} = {tm['total_tok_s'] / r['total_tok_s']:.2f}"
                                   for fam, r in best.items() if fam != "tokenmill")]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    ap.add_argument("--workloads", default="w,long")
    ap.add_argument("--tiers", default=",".join(TIERS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny workloads and grids: a smoke run, not a measurement")
    ap.add_argument("--prepare", action="store_true", help="only export the peers' models, then exit")
    ap.add_argument("--no-peers", action="store_true", help="tokenmill alone (a smoke test of the harness)")
    ap.add_argument("--ct2-batch-sizes", default=",".join(map(str, CT2_BATCH_SIZES)),
                    help="CTranslate2's batch sizes to search (on the long workload one float32 run takes ~10 min)")
    ap.add_argument("--skip-ct2", action="store_true",
                    help="OpenVINO alone beside tokenmill (CTranslate2 pads each batch to its longest prompt: slow on "
                         "the long workload)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tokenmill-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tokenmill_child:
        tokenmill_child(args.tokenmill_child)
        return
    if args.prepare:
        for k, v in prepare(args.model).items():
            print(f"{k}: {v}")
        return
    tiers = args.tiers.split(",")
    bad = sorted(set(tiers) - set(TIERS))
    if bad:
        raise SystemExit(f"unknown tier(s) {', '.join(bad)}; known: {', '.join(TIERS)}")
    from tokenmill.model.loader import load_tokenizer, read_model_config, resolve_model_path

    tok = load_tokenizer(read_model_config(resolve_model_path(args.model))[0])
    try:
        ct2_sizes = [int(x) for x in args.ct2_batch_sizes.split(",")]
    except ValueError:
        ap.error(f"--ct2-batch-sizes takes integers separated by commas, got {args.ct2_batch_sizes!r}")
    result = run_section(args.model, tok, args.workloads.split(","), tiers, args.rounds, args.quick, args.threads,
                         peers=not args.no_peers, ct2_sizes=ct2_sizes, skip_ct2=args.skip_ct2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"peers-{stamp}.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (out / f"peers-{stamp}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
