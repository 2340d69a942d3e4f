"""OUTPUT.manifest.json: what a job's results answer, so a resume never mixes in results of another job.

It records three things:
- ``input``: the input's identity (path, size, mtime, format and the SHA-256 of its bytes). A resume must read the
  same bytes; a moved or renamed file with the same content is fine (a note says so).
- ``settings``: everything that decides the outputs (model and a fingerprint of its files, tokenmill's version,
  dtype, quantization, max_model_len, the sampling defaults, ...). Any change refuses the resume, naming it.
- ``speed``: options that only change how fast the job runs (max_num_seqs, max_num_batched_tokens, threads, KV
  memory, ...). They may change between runs; a note lists what changed.

A refused resume says what differs and what to do (the original input or settings, another -o, or --overwrite).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.files import JobPaths, write_json_atomic

# Engine options that change speed, never outputs (greedy float32 results are the same token for token).
SPEED_OPTIONS = {"max_num_seqs", "max_num_batched_tokens", "num_threads", "kv_cache_memory", "gpu_memory_utilization",
                 "num_kv_blocks", "block_size", "enable_chunked_prefill", "prefill_chunk_size", "preemption_mode",
                 "scheduling_strategy", "sort_by_length", "attention_backend", "device", "cache_dir",
                 "max_batch_tokens", "enable_prefix_caching", "batch_token_budget", "swap_space", "max_loras"}


def tokenmill_version() -> str:
    try:
        return metadata.version("tokenmill")
    except metadata.PackageNotFoundError:
        from tokenmill import __version__

        return __version__


def build_manifest(kind: str, input_identity: dict, settings: dict, speed: dict) -> dict:
    return {"kind": kind, "input": input_identity,
            "settings": {"tokenmill_version": tokenmill_version(), **settings},
            "speed": dict(sorted(speed.items()))}


def split_engine_options(options: dict) -> tuple[dict, dict]:
    """(options that decide outputs, options that only change speed)."""
    decides = {k: v for k, v in options.items() if k not in SPEED_OPTIONS}
    speed = {k: v for k, v in options.items() if k in SPEED_OPTIONS}
    return decides, speed


def _short(identity: dict) -> str:
    return f"{identity.get('path')} ({identity.get('size')} bytes, sha256 {str(identity.get('sha256'))[:12]})"


def check_manifest(paths: JobPaths, new: dict, say) -> None:
    """Refuses (JobSetupError) a resume whose input or output-deciding settings differ from the manifest's; ``say``
    gets a note for a moved input or changed speed options."""
    if not paths.manifest.exists():
        return
    fix = f"pass --overwrite to discard the results in {paths.output} and start afresh, or write to another -o"
    try:
        old = json.loads(paths.manifest.read_text())
        if not isinstance(old, dict):
            raise ValueError("not an object")
    except (ValueError, OSError) as e:
        raise JobSetupError(f"{paths.manifest} is damaged ({type(e).__name__}), so the results beside it cannot be "
                            f"matched to this job; {fix}") from None
    if "settings" not in old or "input" not in old or not isinstance(old["input"], dict):
        raise JobSetupError(f"{paths.manifest} was written by an older tokenmill and does not identify its input; "
                            f"{fix}")
    if old.get("kind") != new["kind"]:
        raise JobSetupError(f"{paths.output} holds the output of `tokenmill {old.get('kind')}`, not of "
                            f"`tokenmill {new['kind']}`; {fix}")
    o, n = old["input"], new["input"]
    if (o.get("sha256"), o.get("size")) != (n["sha256"], n["size"]):
        raise JobSetupError(f"{paths.output} was started from a different input: it holds results for {_short(o)}, "
                            f"and this run reads {_short(n)}. Its results answer other rows: run the original input "
                            f"to finish that job, or {fix}")
    if o.get("path") != n["path"]:
        say(f"note: the input moved ({o.get('path')} -> {n['path']}); same content, resuming")
    os_, ns = old["settings"], new["settings"]
    diffs = [k for k in sorted(set(os_) | set(ns)) if os_.get(k) != ns.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: was {json.dumps(os_.get(k))[:80]}, now {json.dumps(ns.get(k))[:80]}" for k in diffs)
        raise JobSetupError(f"{paths.output} was started with different settings ({detail}); run with the same "
                            f"settings to resume, or {fix}")
    sp_old, sp_new = old.get("speed", {}), new["speed"]
    changed = [k for k in sorted(set(sp_old) | set(sp_new)) if sp_old.get(k) != sp_new.get(k)]
    if changed:
        say("note: resuming with other speed settings (" + ", ".join(
            f"{k} {sp_old.get(k, 'default')} -> {sp_new.get(k, 'default')}" for k in changed) + "); outputs are not "
            "affected")


def write_manifest(paths: JobPaths, manifest: dict) -> None:
    write_json_atomic(paths.manifest, manifest, durable=True)
