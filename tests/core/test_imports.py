"""The scheduler core is pure Python: importing it (or the package, the config, the sampling parameters) loads
neither torch nor the model code. Checked in a fresh interpreter, where nothing else has imported them."""

import subprocess
import sys


def test_core_imports_without_torch():
    code = ("import sys, tokenmill, tokenmill.core.scheduler, tokenmill.core.kv_cache_manager, tokenmill.config, "
            "tokenmill.sampling_params\n"
            "heavy = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'tokenmill.model', "
            "'tokenmill.engine', 'transformers')))\n"
            "assert not heavy, heavy\n"
            "from tokenmill import SamplingParams, EngineConfig\n"
            "assert 'torch' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_the_public_names_still_import_from_the_package():
    import tokenmill

    assert {"LLM", "LLMEngine", "Embedder", "SamplingParams", "EngineConfig", "ConfigError",
            "RequestOutput"} <= set(dir(tokenmill))
    assert tokenmill.LLM.__name__ == "LLM" and tokenmill.ConfigError.__name__ == "ConfigError"


def test_the_engine_layers_never_import_the_layers_above_them():
    """core, model, kernels, attention, ops, worker, parallel, structured and engine are what jobs, the server, the
    CLI, Ray and embeddings are built on: none of them imports those (SmoothQuant once reached up into jobs for the
    model fingerprint; it lives in model/fingerprint.py now)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "tokenmill"
    upward = re.compile(r"^\s*(from|import)\s+tokenmill\.(jobs|serve|cli|distributed|embed)\b", re.MULTILINE)
    below = ("core", "model", "kernels", "attention", "ops", "worker", "parallel", "structured", "engine")
    found = [f"{p.relative_to(root)}: {m.group(0).strip()}" for d in below for p in sorted((root / d).rglob("*.py"))
             for m in upward.finditer(p.read_text())]
    assert not found, found
