"""The GPU benchmark: one command on one GPU, under 8 minutes, one JSON result and one markdown table.

    python benchmarks/gpu_bench.py --out benchmarks/runs            # on a CUDA machine
    python benchmarks/gpu_bench.py --smoke --out /tmp/gpu-smoke      # any machine: tiny shapes, proves the script runs

Sections, in this order (each guarded: one that fails records its error and the rest still run; one that would start
past ``--deadline`` seconds is recorded as skipped, and a running engine workload stops at the deadline and says so):

- ``decode_floor``: the decode step at batch 256 on the Llama-3.1-8B shape (dummy weights, every sequence holding
  ``--floor-context`` tokens) against the HBM floor: (weight bytes + the K/V bytes the step reads) / the device's copy
  bandwidth measured in the same run.
- ``nanovllm``: nano-vllm's own benchmark workload: Qwen3-0.6B shape, dummy weights, 256 sequences of random token ids,
  input and output lengths uniform in 100..1024, temperature 0.6, ignore_eos. Published (RTX 4070 laptop): nano-vllm
  1,434 and vLLM 1,362 output tok/s.
- ``llama8b_short``: Llama-3.1-8B shape, dummy weights, 1,000 requests of 128 tokens in / 128 out (greedy).
- ``llama8b_long``: the same model, 500 requests of 1,000 in / 1,000 out (stopped early enough to leave transformers
  its time).
- ``hf``: transformers on the same workloads (the first requests of each, time-boxed): ``generate`` with static
  batches (left padding) at each batch size of a ladder, the best one kept, and continuous batching
  (``generate_batch``) where the installed version has it. Throughput counts each request's own output tokens (the
  useful ones): static batches that run to their longest request generate more than that.

Targets (issue 27): tokenmill >= 3x transformers' best mode; the 8B decode step within 70% of the floor (floor / step
time >= 0.7); nano-vllm's workload >= 10x its published laptop figure on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.__main__ import machine_info  # noqa: E402

SHAPES = ROOT / "benchmarks" / "shapes"
NANOVLLM_PUBLISHED = {"nano-vllm (RTX 4070 laptop)": 1434.0, "vLLM (RTX 4070 laptop)": 1362.0}


@dataclass
class Job:
    """One workload: prompts as token ids, one output length per request, sampled at ``temperature``."""

    name: str
    prompts: list[list[int]]
    output_lens: list[int]
    temperature: float = 0.0

    def head(self, n: int) -> "Job":
        return Job(self.name, self.prompts[:n], self.output_lens[:n], self.temperature)


def random_job(name: str, n: int, in_range: tuple[int, int], out_range: tuple[int, int], vocab: int,
               temperature: float = 0.0, seed: int = 0) -> Job:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*in_range))] for _ in range(n)]
    return Job(name, prompts, [rng.randint(*out_range) for _ in range(n)], temperature)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- tokenmill
def make_llm(model_dir: Path, device: str, options: dict):
    from tokenmill import LLM

    return LLM(str(model_dir), load_format="dummy", device=device, **options)


def run_tokenmill(llm, job: Job, deadline: float) -> dict:
    """Adds every request, steps the engine to the end (or the deadline); output tokens / wall time."""
    from tokenmill import SamplingParams

    eng = llm.engine
    warm_t0 = time.perf_counter()
    eng.add_request("warmup", job.prompts[0][:64], SamplingParams(max_tokens=4, ignore_eos=True))
    while eng.has_unfinished_requests():  # kernels compiled and autotuned outside the timed part
        eng.step()
    sync(eng.device)
    warmup_s = time.perf_counter() - warm_t0
    before = eng.stats.num_steps, eng.stats.sum_running
    for i, (p, n) in enumerate(zip(job.prompts, job.output_lens)):
        eng.add_request(f"{job.name}-{i}", p, SamplingParams(max_tokens=n, temperature=job.temperature,
                                                             ignore_eos=True, seed=i if job.temperature else None))
    gen = 0
    truncated = False
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        gen += len(eng.step_with_deltas().new_token_ids)
        if time.perf_counter() > deadline:
            truncated = True
            eng.abort_request(list(eng.scheduler.requests))
            eng.step()  # frees what the abort finished
            break
    sync(eng.device)
    wall = time.perf_counter() - t0
    steps = eng.stats.num_steps - before[0]
    return {"engine": "tokenmill", "requests": len(job.prompts), "output_tokens": gen, "wall_s": round(wall, 3),
            "output_tok_s": round(gen / wall, 1), "steps": steps,
            "avg_batch": round((eng.stats.sum_running - before[1]) / max(1, steps), 1),
            "warmup_s": round(warmup_s, 2), "truncated_at_deadline": truncated,
            "cuda_graphs": eng.runner.graphs is not None,
            "graph_replays": eng.runner.graphs.num_replays if eng.runner.graphs is not None else 0,
            "attention_backend": eng.ops.name, "load_s": round(eng.load_seconds, 1)}


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (each byte read once and written once), best of 5."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def run_decode_floor(llm, batch: int, context: int, steps: int, bw_bytes: int, deadline: float) -> dict:
    """Mean decode step time with ``batch`` sequences of ``context`` tokens, against (weights + K/V read) / bandwidth."""
    from tokenmill import SamplingParams
    from tokenmill.worker.memory import kv_bytes_per_block

    eng = llm.engine
    rng = random.Random(1)
    done_before = eng.num_prompt_tokens_done
    for i in range(batch):
        eng.add_request(f"floor-{i}", [rng.randrange(min(1000, eng.model_config.vocab_size)) for _ in range(context)],
                        SamplingParams(max_tokens=steps + 64, ignore_eos=True))
    while eng.num_prompt_tokens_done - done_before < batch * context:  # prefill everything (and a few decodes)
        eng.step()
        if time.perf_counter() > deadline:
            raise TimeoutError("the prefill of the decode-floor batch ran past the deadline")
    for _ in range(3):  # warm decode steps
        eng.step()
    times = []
    for _ in range(steps):
        sync(eng.device)
        t0 = time.perf_counter()
        res = eng.step_with_deltas()
        sync(eng.device)
        times.append(time.perf_counter() - t0)
        assert len(res.new_token_ids) == batch, "a decode-floor step did not run the whole batch"
    eng.abort_request(list(eng.scheduler.requests))
    eng.step()
    mc, bs = eng.model_config, eng.config.block_size
    kv_per_token = kv_bytes_per_block(mc, bs, eng.runner.kv_caches[0][0].dtype) // bs
    mean_ctx = context + 3 + steps / 2
    step_bytes = eng.weight_bytes + batch * mean_ctx * kv_per_token
    bw = copy_bandwidth(eng.device, bw_bytes)
    step_s = sorted(times)[len(times) // 2]
    floor_s = step_bytes / bw
    return {"batch": batch, "context": context, "median_step_ms": round(step_s * 1e3, 3),
            "cuda_graphs": eng.runner.graphs is not None,
            "weight_gb": round(eng.weight_bytes / 1e9, 3), "kv_read_gb": round(batch * mean_ctx * kv_per_token / 1e9, 3),
            "copy_bandwidth_gb_s": round(bw / 1e9, 1), "floor_ms": round(floor_s * 1e3, 3),
            "floor_over_step": round(floor_s / step_s, 3)}


# ---------------------------------------------------------------- transformers
def make_hf(model_dir: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # small weights as tokenmill's dummy ones (finite logits, no overflow)
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.uniform_(-1e-3, 1e-3)
    return model.eval()


@torch.inference_mode()
def run_hf_static(model, job: Job, batch_size: int, device: torch.device) -> dict:
    """``generate`` over static batches, left-padded, each batch to its longest requested output."""
    t0 = time.perf_counter()
    useful = 0
    for i in range(0, len(job.prompts), batch_size):
        prompts, outs = job.prompts[i:i + batch_size], job.output_lens[i:i + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        n = max(outs)
        kw = {"do_sample": True, "temperature": job.temperature} if job.temperature else {"do_sample": False}
        model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n,
                       pad_token_id=0, eos_token_id=None, **kw)
        useful += sum(outs)
    sync(device)
    wall = time.perf_counter() - t0
    return {"engine": f"transformers generate static bs={batch_size}", "requests": len(job.prompts),
            "output_tokens": useful, "wall_s": round(wall, 3), "output_tok_s": round(useful / wall, 1)}


@torch.inference_mode()
def run_hf_continuous(model, job: Job, device: torch.device) -> dict | None:
    if not hasattr(model, "generate_batch"):
        return None
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max(job.output_lens), do_sample=bool(job.temperature),
                           temperature=job.temperature or 1.0, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    outs = model.generate_batch(job.prompts, generation_config=cfg)
    sync(device)
    wall = time.perf_counter() - t0
    gen = sum(len(o.generated_tokens) for o in outs.values())
    useful = sum(min(len(o.generated_tokens), n) for o, n in zip(outs.values(), job.output_lens))
    return {"engine": "transformers generate_batch", "requests": len(job.prompts), "output_tokens": useful,
            "generated_tokens": gen, "wall_s": round(wall, 3), "output_tok_s": round(useful / wall, 1)}


def run_hf_peers(model_dir: Path, jobs: list[tuple[Job, list[int]]], device: torch.device, dtype: torch.dtype,
                 deadline: float) -> list[dict]:
    """transformers on the first requests of each job: the static ladder (best kept) and generate_batch."""
    model = make_hf(model_dir, device, dtype)
    rows = []
    for job, ladder in jobs:
        static = []
        for bs in ladder:
            if time.perf_counter() > deadline:
                static.append({"engine": f"transformers generate static bs={bs}", "skipped": "deadline"})
                continue
            static.append(guard(lambda: run_hf_static(model, job.head(bs), bs, device)))
        ok = [r for r in static if "output_tok_s" in r]
        best = max(ok, key=lambda r: r["output_tok_s"]) if ok else None
        for r in static:
            rows.append({"workload": job.name, **r, "best_static": r is best})
        if time.perf_counter() < deadline:
            cb = guard(lambda: run_hf_continuous(model, job.head(max(ladder)), device))
            if cb:
                rows.append({"workload": job.name, **cb})
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- driver
def guard(fn):
    try:
        return fn()
    except Exception as e:  # one failing section must not lose the others' figures
        return {"error": f"{type(e).__name__}: {str(e)[:300]}", "traceback": traceback.format_exc()[-2000:]}


def settings(smoke: bool) -> dict:
    """Shapes and sizes: the issue's on a GPU; tiny ones (same code paths) for --smoke."""
    if not smoke:
        return {"qwen": SHAPES / "qwen3-0.6b", "llama": SHAPES / "llama-3.1-8b",
                "nanovllm": (256, (100, 1024), (100, 1024)), "short": (1000, (128, 128), (128, 128)),
                "long": (500, (1000, 1000), (1000, 1000)), "floor": (256, 1024, 20), "bw_bytes": 2**31,
                "hf_ladder": {"nanovllm": [64, 256], "short": [64, 128, 256], "long": [64]}, "hf_reserve_s": 150.0,
                "options": {"max_num_seqs": 512, "max_num_batched_tokens": 8192, "max_model_len": 4096}}
    return {"qwen": None, "llama": None,
            "nanovllm": (8, (4, 24), (4, 24)), "short": (12, (8, 8), (8, 8)), "long": (4, (24, 24), (24, 24)),
            "floor": (8, 16, 3), "bw_bytes": 2**22,
            "hf_ladder": {"nanovllm": [4, 8], "short": [4], "long": [2]}, "hf_reserve_s": 0.0,
            "options": {"max_num_seqs": 16, "max_num_batched_tokens": 128, "max_model_len": 256,
                        "kv_cache_memory": 0.05}}


def tiny_config_dir(kind: str, root: Path) -> Path:
    """A config.json of the same architecture as the GPU shape, at a size a CPU runs in seconds."""
    base = json.loads((SHAPES / ("qwen3-0.6b" if kind == "qwen" else "llama-3.1-8b") / "config.json").read_text())
    base.update(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, torch_dtype="float32",
                bos_token_id=1, eos_token_id=2)
    base.pop("rope_scaling", None)
    d = root / kind
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(base))
    return d


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"## GPU benchmark ({m['date']}, commit {m['commit']})", "",
             f"Device: {m.get('gpu', 'cpu')}; torch {m['torch']}; triton {m.get('triton')}; "
             f"elapsed {result['elapsed_s']} s", ""]
    if result["smoke"]:
        lines += ["**--smoke: tiny shapes on this machine; the figures check the script and measure nothing.**", ""]
    floor = result.get("decode_floor", {})
    if "floor_over_step" in floor:
        lines += [f"Decode floor (8B shape, batch {floor['batch']}, context {floor['context']}): step "
                  f"{floor['median_step_ms']} ms, floor {floor['floor_ms']} ms (copy bandwidth "
                  f"{floor['copy_bandwidth_gb_s']} GB/s): floor / step = {floor['floor_over_step']}", ""]
    elif floor:
        lines += [f"Decode floor: {floor.get('error') or floor.get('skipped')}", ""]
    lines += ["| workload | engine | requests | output tokens | wall s | output tok/s | note |", "|---|---|---|---|---|---|---|"]
    for name in ("nanovllm", "llama8b_short", "llama8b_long"):
        r = result.get(name, {})
        note = r.get("error") or r.get("skipped") or "; ".join(
            [f"{r.get('attention_backend')}, CUDA graphs {'on' if r.get('cuda_graphs') else 'off'}"]
            + (["truncated at the deadline"] if r.get("truncated_at_deadline") else []))
        lines.append(f"| {name} | tokenmill | {r.get('requests', '')} | {r.get('output_tokens', '')} | "
                     f"{r.get('wall_s', '')} | {r.get('output_tok_s', '')} | {note} |")
    for r in result.get("hf", []):
        note = r.get("error") or r.get("skipped") or ("best static" if r.get("best_static") else "")
        lines.append(f"| {r.get('workload', '')} | {r.get('engine', '')} | {r.get('requests', '')} | "
                     f"{r.get('output_tokens', '')} | {r.get('wall_s', '')} | {r.get('output_tok_s', '')} | {note} |")
    lines.append("")
    for k, v in result.get("ratios", {}).items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


def ratios(result: dict) -> dict:
    out = {}
    hf = result.get("hf", [])
    for name, wl in (("nanovllm", "nanovllm"), ("llama8b_short", "llama8b_short"), ("llama8b_long", "llama8b_long")):
        tm = result.get(name, {}).get("output_tok_s")
        best = max((r["output_tok_s"] for r in hf if r.get("workload") == wl and "output_tok_s" in r), default=None)
        if tm and best:
            out[f"{name}: tokenmill / transformers best"] = round(tm / best, 2)
    tm = result.get("nanovllm", {}).get("output_tok_s")
    if tm:
        out["nanovllm: tokenmill / nano-vllm published (RTX 4070 laptop)"] = round(
            tm / NANOVLLM_PUBLISHED["nano-vllm (RTX 4070 laptop)"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "runs")
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cuda or cpu")
    ap.add_argument("--deadline", type=float, default=450.0, help="seconds after start past which nothing new starts")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU): checks the script, measures nothing")
    ap.add_argument("--sections", default="decode_floor,nanovllm,llama8b_short,hf,llama8b_long")
    ap.add_argument("--option", action="append", default=[], help="tokenmill engine option key=value (JSON value)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.deadline
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.smoke and device.type == "cuda":
        print("gpu_bench: --smoke is for machines without a GPU; drop it on a CUDA machine", file=sys.stderr)
        return 2
    s = settings(args.smoke)
    options = {**s["options"], **{k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}}
    sections = args.sections.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    qwen_dir = s["qwen"] or tiny_config_dir("qwen", tmp)
    llama_dir = s["llama"] or tiny_config_dir("llama", tmp)
    vocab = 10000 if not args.smoke else 500
    jobs = {
        "nanovllm": random_job("nanovllm", *s["nanovllm"], vocab=vocab, temperature=0.6),
        "llama8b_short": random_job("llama8b_short", *s["short"], vocab=vocab),
        "llama8b_long": random_job("llama8b_long", *s["long"], vocab=vocab, seed=1),
    }
    info = machine_info()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    result: dict = {"machine": info, "device": device.type, "options": options, "smoke": args.smoke,
                    "deadline_s": args.deadline}

    def section(name: str, fn):
        if name not in sections:
            return
        if time.perf_counter() > deadline:
            result[name] = {"skipped": "deadline"}
            return
        t0 = time.perf_counter()
        result[name] = guard(fn)
        print(f"gpu_bench: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    # One engine at a time: on CUDA an engine's KV pool takes what gpu_memory_utilization leaves.
    if "nanovllm" in sections:
        qwen = guard(lambda: make_llm(qwen_dir, device.type,
                                      {**options, "max_num_seqs": max(options["max_num_seqs"], s["nanovllm"][0])}))
        section("nanovllm", (lambda: qwen) if isinstance(qwen, dict) else  # a load error is the section's result
                (lambda: run_tokenmill(qwen, jobs["nanovllm"], deadline)))
        free(device, qwen)
        del qwen
    if {"decode_floor", "llama8b_short", "llama8b_long"} & set(sections):
        llama = guard(lambda: make_llm(llama_dir, device.type, options))

        def on_llama(fn):
            return (lambda: llama) if isinstance(llama, dict) else (lambda: fn(llama))

        section("decode_floor", on_llama(lambda m: run_decode_floor(m, *s["floor"], s["bw_bytes"], deadline)))
        section("llama8b_short", on_llama(lambda m: run_tokenmill(m, jobs["llama8b_short"], deadline)))
        reserve = s["hf_reserve_s"] if "hf" in sections else 0.0  # the long run leaves transformers its time
        section("llama8b_long", on_llama(lambda m: run_tokenmill(m, jobs["llama8b_long"], deadline - reserve)))
        free(device, llama)
        del llama
    if "hf" in sections:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ladder = s["hf_ladder"]
        rows = []
        if time.perf_counter() < deadline:
            rows += guard_rows(lambda: run_hf_peers(qwen_dir, [(jobs["nanovllm"], ladder["nanovllm"])], device, dtype,
                                                    deadline))
        if time.perf_counter() < deadline:
            rows += guard_rows(lambda: run_hf_peers(llama_dir, [(jobs["llama8b_short"], ladder["short"]),
                                                                (jobs["llama8b_long"], ladder["long"])], device,
                                                    dtype, deadline))
        result["hf"] = rows
    result["ratios"] = ratios(result)
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu-{info['date'].replace(' ', '-').replace(':', '')}-{info['commit']}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def free(device: torch.device, llm) -> None:
    """Drops an engine's model and KV cache (the caller deletes its own reference too)."""
    import gc

    if not isinstance(llm, dict):
        llm.engine.runner.kv_caches.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def guard_rows(fn) -> list[dict]:
    r = guard(fn)
    return [r] if isinstance(r, dict) else r


if __name__ == "__main__":
    sys.exit(main())
