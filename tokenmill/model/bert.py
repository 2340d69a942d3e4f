"""BERT-family encoders (BertModel; RoBERTa / XLM-RoBERTa position offsets) over a flat, packed batch.

One forward pass takes the tokens of many sequences end to end (no padding), their positions and ``seq_lens``, and
returns the last hidden state of every token: [num_tokens, hidden]. Post-LayerNorm blocks, absolute position
embeddings, token type 0 everywhere (single-text embedding), bidirectional attention within each sequence.
q/k/v are fused into one matmul; ``load_weights`` maps HF checkpoint names onto it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tokenmill.model.layers import Build, Embedding, Linear
from tokenmill.model.model_config import UnsupportedModelError
from tokenmill.model.weights import WeightPlacer

BERT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}  # HF -> gemm


@dataclass(frozen=True)
class BertConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    position_offset: int  # first position id: 0 for BERT, pad_token_id + 1 for RoBERTa

    @property
    def max_tokens(self) -> int:
        """Longest sequence the position table allows."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "BertConfig":
        model_type = d.get("model_type")
        if model_type not in BERT_MODEL_TYPES:
            raise UnsupportedModelError(f"not a BERT-family encoder: model_type {model_type!r}")
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError(
                f"unsupported position_embedding_type {d['position_embedding_type']!r}; tokenmill supports absolute")
        act = d.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"unsupported hidden_act {act!r}; tokenmill supports {', '.join(_ACTIVATIONS)}")
        offset = d.get("pad_token_id", 1) + 1 if model_type != "bert" else 0
        return cls(model_type, d["vocab_size"], d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"],
                   d["num_attention_heads"], d.get("max_position_embeddings", 512), d.get("type_vocab_size", 2),
                   d.get("layer_norm_eps", 1e-12), act, offset)

    def num_parameters(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = 4 * h * h + 2 * h * i
        return L * per_layer + (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig, build: Build) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = h // self.num_heads
        self.ops = build.ops
        norm = dict(eps=cfg.layer_norm_eps, dtype=build.dtype, device=build.device)
        self.qkv = Linear(h, 3 * h, True, build)
        self.attn_out = Linear(h, h, True, build)
        self.attn_norm = nn.LayerNorm(h, **norm)
        self.intermediate = Linear(h, cfg.intermediate_size, True, build)
        self.out = Linear(cfg.intermediate_size, h, True, build)
        self.out_norm = nn.LayerNorm(h, **norm)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:  # x: [num_tokens, hidden]
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each [n, heads, head_dim]
        ctx = self.ops.packed_attention(q, k, v, seq_lens, self.head_dim**-0.5, causal=False)
        # The residual adds and the activation run as GEMM epilogues (model/gemm.py).
        x = self.attn_norm(self.attn_out.forward_add(ctx.reshape(n, -1), x))
        h = self.intermediate.forward_act(x, self.act)  # [n, intermediate]
        return self.out_norm(self.out.forward_add(h, x))


class BertModel(nn.Module):
    """``build.quantization`` (model/quant.py) applies to the encoder layers' linears; embeddings stay float."""

    def __init__(self, cfg: BertConfig, build: Build) -> None:
        super().__init__()
        self.config = cfg
        h = cfg.hidden_size
        floats = build.with_quantization("none")
        self.word_embeddings = Embedding(cfg.vocab_size, h, floats)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, h, floats)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, h, floats)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, dtype=build.dtype, device=build.device)
        self.layers = nn.ModuleList(BertLayer(cfg, build) for _ in range(cfg.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens], 0-based within each sequence
        seq_lens: list[int],
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions + self.config.position_offset)
             + self.token_type_embeddings.weight[0])
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, seq_lens)
        return x

    # ------------------------------------------------------------------ weights
    _RENAMES = (  # HF name piece -> ours (after the "encoder.layer.N." / "embeddings." prefixes)
        ("embeddings.word_embeddings.", "word_embeddings."),
        ("embeddings.position_embeddings.", "position_embeddings."),
        ("embeddings.token_type_embeddings.", "token_type_embeddings."),
        ("embeddings.LayerNorm.", "embed_norm."),
        ("encoder.layer.", "layers."),
        (".attention.output.dense.", ".attn_out."),
        (".attention.output.LayerNorm.", ".attn_norm."),
        (".intermediate.dense.", ".intermediate."),
        (".output.dense.", ".out."),
        (".output.LayerNorm.", ".out_norm."),
    )
    _QKV = {".attention.self.query.": 0, ".attention.self.key.": 1, ".attention.self.value.": 2}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors in; raises if any parameter is left unloaded or a name is unknown."""
        placer = WeightPlacer(self)
        h = self.config.hidden_size
        for hf_name, tensor in weights:
            name = hf_name
            for prefix in ("bert.", "roberta.", "model."):
                name = name.removeprefix(prefix)
            if name.startswith("pooler.") or name.endswith("position_ids") or name.startswith(("cls.", "lm_head.")):
                continue  # the pooler / MLM heads are not part of sentence embeddings
            name = name.replace(".gamma", ".weight").replace(".beta", ".bias")
            for piece, shard in self._QKV.items():
                if piece in name:
                    target = name.replace("encoder.layer.", "layers.").replace(piece, ".qkv.")
                    placer.put(target, tensor, hf_name, shard, len(self._QKV), shard * h, h)
                    break
            else:
                for old, new in self._RENAMES:
                    name = name.replace(old, new)
                placer.put(name, tensor, hf_name)
        placer.check()

