"""The Llama family over a flat, unpadded batch and a paged KV cache: Llama, Mistral, Qwen2, Qwen3, Phi-3 (fused
qkv and gate_up in its checkpoints, partial rotary), Gemma 2 / 3 (sandwich norms, GeGLU, sliding layers, softcaps)
and the mixture-of-experts decoders Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (sparse layers' MLPs are
``moe.SparseMoE``).

One forward pass takes the tokens of many requests at once (prefill chunks and decodes mixed), their positions and
the attention metadata; it returns hidden states for every token. ``compute_logits`` runs the LM head only on the
rows the caller selects (the tokens whose next token is sampled).

q/k/v and gate/up projections are fused into one matmul each; ``load_weights`` maps HF checkpoint names onto them.

Under tensor parallelism (``build.tp``, N ranks) each rank holds 1/N of the q and KV heads (qkv_proj's rows, o_proj's
columns), of the MLP's intermediate channels (gate_up_proj's rows, down_proj's columns) and of the vocabulary
(embedding and LM-head rows); o_proj and down_proj sum the ranks' partial outputs (rank 0 adds the residual), and
``compute_logits`` joins the vocabulary slices. ``load_weights`` takes the full checkpoint tensors and keeps this
rank's slice of each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend, AttentionMetadata
from tokenmill.model.gemm import linear, pack
from tokenmill.model.layers import MLP, Build, Embedding, Linear, RMSNorm, RotaryEmbedding
from tokenmill.model.model_config import ModelConfig
from tokenmill.model.moe import SparseMoE
from tokenmill.model.weights import WeightPlacer


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, build: Build, layer: int = 0) -> None:
        super().__init__()
        self.tp = build.tp
        self.num_heads = build.tp.split(cfg.num_attention_heads, "num_attention_heads")  # this rank's
        self.num_kv_heads = build.tp.split(cfg.num_key_value_heads, "num_key_value_heads")
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = cfg.attn_scale or self.head_dim**-0.5
        self.window = cfg.window_of(layer)  # sliding window (None: every earlier key)
        self.softcap = cfg.attn_softcap
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, build,
                               shard_sizes=(self.q_size, self.kv_size, self.kv_size))
        self.o_proj = Linear(self.q_size, cfg.hidden_size, False, build)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, build) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, build) if cfg.qk_norm else None
        if cfg.qk_norm_whole:  # OLMoE: over all heads at once, so every rank would need every head
            if build.tp.size > 1:
                raise ValueError(f"{cfg.architecture} normalises q and k over all heads: no tensor parallelism")
            self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps, build)
            self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps, build)
        self.rotary_dim = cfg.rotary_dim or cfg.head_dim
        self.whole_qk_norm = cfg.qk_norm_whole
        self.clip_qkv = cfg.clip_qkv
        self.rotary = rotary

    def forward(
        self,
        positions: torch.Tensor,  # [num_tokens]
        x: torch.Tensor,  # [num_tokens, hidden]
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # 2 x [num_blocks, block_size, kv_heads, head_dim]
        meta: AttentionMetadata,
        backend: AttentionBackend,
        residual: torch.Tensor | None,  # [num_tokens, hidden]: added in the o_proj GEMM's epilogue (None: not)
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.whole_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:  # after the norms, as OLMoE does
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.whole_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_dim < self.head_dim:  # partial rotary: the first rotary_dim channels of each head turn
            r = self.rotary_dim
            q_rot, k_rot = self.rotary(positions, q[..., :r].contiguous(), k[..., :r].contiguous())
            q, k = torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)
        else:
            q, k = self.rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window,
                              self.softcap)  # [num_tokens, heads, head_dim]
        if residual is None:  # Gemma: the output is normalised before the residual add
            partial = self.o_proj(out.reshape(n, self.q_size))
            return partial if self.tp.size == 1 else self.tp.all_reduce(partial)
        if self.tp.size == 1:
            return self.o_proj.forward_add(out.reshape(n, self.q_size), residual)
        partial = self.o_proj(out.reshape(n, self.q_size), residual if self.tp.rank == 0 else None)
        return self.tp.all_reduce(partial)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, build: Build, sparse: bool = False,
                 layer: int = 0) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps, build)
        self.self_attn = Attention(cfg, rotary, build, layer)
        self.post_attention_layernorm = RMSNorm(h, eps, build)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:  # Gemma: post_attention_layernorm normalises attention's output; these wrap the MLP
            self.pre_feedforward_layernorm = RMSNorm(h, eps, build)
            self.post_feedforward_layernorm = RMSNorm(h, eps, build)
        self.mlp = SparseMoE(cfg, build) if sparse else MLP(h, cfg.intermediate_size, build, cfg.hidden_act)

    def forward(self, positions, x, kv_cache, meta, backend) -> torch.Tensor:
        """The residual adds run in the o_proj and down_proj GEMMs' epilogues (one rounding in bfloat16; in float32
        the same single addition as x + out). Gemma's sandwich: x + norm(attn(norm(x))), then the same for the MLP."""
        if self.sandwich:
            x = x + self.post_attention_layernorm(
                self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, backend, residual=None))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), residual=None))
        x = self.self_attn(positions, self.input_layernorm(x), kv_cache, meta, backend, residual=x)
        return self.mlp(self.post_attention_layernorm(x), residual=x)


_OTHER_MODALITIES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# an image+text checkpoint's language model (Gemma 3 4B-27B): its names under the text model's
_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                            ("language_model.lm_head.", "lm_head."))


def _language_model_name(hf_name: str) -> str:
    for prefix, ours in _LANGUAGE_MODEL_PREFIXES:
        if hf_name.startswith(prefix):
            return ours + hf_name[len(prefix):]
    return hf_name


class LlamaForCausalLM(nn.Module):
    """Also Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm), Phi-3, Gemma 2 / 3 (sandwich norms, GeGLU, scaled
    embeddings, sliding layers, softcaps) and the MoE decoders: the differences live in ModelConfig flags.

    ``quantization`` (model/quant.py) applies to the decoder layers' linears. The embeddings stay in the model's float
    dtype; so does the LM head, except with w8a8, where it runs as an int8 GEMM too (measured: ~6% of a decode step
    for +0.2% perplexity on SmolLM2); a tied head then gets its own int8 copy of the embeddings. A tied float head on
    the oneDNN GEMM path gets a prepacked copy of them (``tied_head``: the embedding matrix held twice, for a head
    GEMM about a quarter faster at 32 rows).

    ``build`` (model/layers.py) gives the kernels, dtype and device of every layer."""

    def __init__(self, cfg: ModelConfig, max_positions: int, build: Build, with_lm_head: bool = True) -> None:
        super().__init__()
        self.config = cfg
        self.ops = build.ops
        self.tp = build.tp
        self.activation_dtype = build.dtype  # the hidden states' and the KV cache's (with kv_cache_dtype "auto")
        quantization = build.quantization
        if build.tp.size > 1 and quantization != "none":
            raise ValueError(f"tensor parallelism runs float weights only, not quantization={quantization!r}")
        floats = build.with_quantization("none")
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, floats)
        rotary = RotaryEmbedding(cfg.rotary_dim or cfg.head_dim, max_positions, cfg.rope, floats)
        self.rotary = rotary
        # Gemma 3's sliding layers turn q and k by a RoPE of their own
        local = (RotaryEmbedding(cfg.rotary_dim or cfg.head_dim, max_positions, cfg.local_rope, floats)
                 if cfg.local_rope is not None else rotary)
        self.local_rotary = local if local is not rotary else None
        sparse = set(cfg.moe_layers)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, local if cfg.window_of(i) is not None else rotary, build, i in sparse, i)
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, floats)
        self.gemm_backend = build.gemm  # of the LM head when it is the embeddings (model/gemm.py)
        self.with_lm_head = with_lm_head
        self.register_buffer("tied_head", None, persistent=False)  # the embeddings packed for the head's GEMM
        self.loras = None  # the LoRA adapters (model/lora.py: attach_loras), or None
        head_quantization = "w8a8" if quantization == "w8a8" else "none"
        if not with_lm_head or (cfg.tie_word_embeddings and head_quantization == "none"):
            self.lm_head = None  # embedding models need no LM head; a float tied head is the embeddings themselves
        else:
            vocab_rows = build.tp.pad_split(cfg.vocab_size)[1]  # this rank's slice of the vocabulary
            self.lm_head = Linear(cfg.hidden_size, vocab_rows, False, build.with_quantization(head_quantization))

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # one (k, v) per layer
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.embed_tokens(input_ids)
        if self.config.embedding_scale is not None:  # Gemma: sqrt(hidden), rounded to the model's dtype first
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(positions, x, kv_cache, meta, backend)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor, as_float32: bool = True) -> torch.Tensor:
        """[num_sampled, hidden] -> [num_sampled, vocab] logits in float32, or with ``as_float32=False`` as the head
        computes them (the model's dtype; float32 for w8a8's int8 head): greedy sampling reads bfloat16 logits
        directly, where widening a decode step's 128 x 49k of them cost 1.5-4 ms."""
        if self.lm_head is not None and self.lm_head.quantized is not None:
            logits = self.lm_head.quantized(hidden, None, out_dtype=torch.float32)
            cap = self.config.final_softcap
            return logits if cap is None else torch.tanh(logits / cap) * cap
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            head = self.tied_head if self.tied_head is not None else self.embed_tokens.weight
            logits = linear(hidden, head, None, self.gemm_backend)
        if self.tp.size > 1:  # [num_sampled, vocab / N] on each rank -> the whole vocabulary
            logits = self.tp.all_gather_last(logits)[:, : self.config.vocab_size]
        cap = self.config.final_softcap
        if cap is not None:  # Gemma 2: cap * tanh(logits / cap), in float32
            return torch.tanh(logits.float() / cap) * cap
        return logits.float() if as_float32 else logits

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[num_sampled, hidden] -> [num_sampled] int64: the argmax of ``compute_logits(hidden)`` per row (the first of
        equal maxima, as the sampler's argmax takes it), fused into the LM head's GEMM where the head can (w8a8's int8
        head on AMX-INT8: ``W8A8Weight.argmax``), so a greedy step never writes its logits; None elsewhere (the caller
        computes the logits). Not with a final softcap (tanh can make distinct logits equal)."""
        if (self.lm_head is None or self.lm_head.quantized is None or self.config.final_softcap is not None
                or self.tp.size > 1 or not hasattr(self.lm_head.quantized, "argmax")):
            return None
        return self.lm_head.quantized.argmax(hidden)

    def use_gemm_backend(self, name: str) -> None:
        """The tied float head's GEMM path (the Linear layers switch themselves): packed embeddings on "onednn" and
        "panels"."""
        if name != self.gemm_backend or self.tied_head is None:
            self.gemm_backend = name
            self._pack_tied_head()

    def _pack_tied_head(self) -> None:
        plain = self.embed_tokens.weight.data
        packed = pack(plain, self.gemm_backend, self.activation_dtype)
        tied = self.with_lm_head and self.lm_head is None
        self.tied_head = packed if tied and packed is not plain else None

    # ------------------------------------------------------------------ weights
    _STACKED = {  # HF name piece -> (our fused param piece, shard index)
        ".q_proj.": (".qkv_proj.", 0),
        ".k_proj.": (".qkv_proj.", 1),
        ".v_proj.": (".qkv_proj.", 2),
        ".gate_proj.": (".gate_up_proj.", 0),
        ".up_proj.": (".gate_up_proj.", 1),
        ".w1.": (".gate_up_proj.", 0),  # Mixtral's experts
        ".w3.": (".gate_up_proj.", 1),
    }
    _RENAMED = {".block_sparse_moe.": ".mlp.", ".w2.": ".down_proj."}  # Mixtral's names -> ours

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors in (float tensors, or Int4Groups / Int8Groups from a GGUF file); each linear layer is
        finalized (quantized weights packed) as soon as all its rows are in. Raises if any weight is left unloaded or a
        name is unknown."""
        placer = WeightPlacer(self)
        for hf_name, tensor in weights:
            if hf_name.startswith(_OTHER_MODALITIES):
                continue  # an image+text checkpoint's vision tower and projector: not the language model's
            name = _language_model_name(hf_name).removeprefix("model.")
            for piece, ours in self._RENAMED.items():
                name = name.replace(piece, ours)
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and (self.lm_head is None or self.config.tie_word_embeddings):
                continue  # tied: some checkpoints store the copy anyway
            if self.config.norm_plus_one and "norm" in name and name.endswith(".weight"):
                tensor = tensor.float() + 1.0  # Gemma's RMSNorm multiplies by (1 + w): held as 1 + w
            if self.tp.size > 1:
                tensor = self._tp_slice(name, tensor)
            for piece, (fused, shard) in self._STACKED.items():
                if piece in name:
                    target = name.replace(piece, fused)
                    layer = placer.linears.get(target.replace(".bias", ".weight"))
                    sizes = layer.shard_sizes if layer is not None else (0, 0)
                    placer.put(target, tensor, hf_name, shard, len(sizes), sum(sizes[:shard]), sizes[shard])
                    break
            else:
                placer.put(name, tensor, hf_name)
        if self.lm_head is not None and self.config.tie_word_embeddings and "embed_tokens.weight" in placer.loaded:
            self.lm_head.load_rows(0, self.embed_tokens.weight.detach(), "embed_tokens.weight")  # the quantized copy
            self.lm_head.finalize()
            placer.loaded.add("lm_head.weight")
        if "embed_tokens.weight" in placer.loaded:
            self._pack_tied_head()
        placer.check()

    # HF name piece -> the dimension split over the ranks: 0 = rows (a column-parallel layer's outputs, the
    # vocabulary), 1 = columns (a row-parallel layer's inputs). Norms are not split.
    _TP_SPLIT = {".q_proj.": 0, ".k_proj.": 0, ".v_proj.": 0, ".gate_proj.": 0, ".up_proj.": 0, ".w1.": 0, ".w3.": 0,
                 ".o_proj.weight": 1, ".down_proj.weight": 1}  # a router (".mlp.gate.", ".shared_expert_gate.") is not

    def _tp_slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full checkpoint tensor (equal slices; the vocabulary's last one zero-padded)."""
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor parallelism needs float checkpoint tensors; {name!r} is {type(tensor).__name__}")
        tp = self.tp
        if name in ("embed_tokens.weight", "lm_head.weight"):
            start, per = tp.pad_split(tensor.shape[0])
            part = tensor[start:start + per]
            if part.shape[0] < per:
                part = torch.cat([part, part.new_zeros(per - part.shape[0], *part.shape[1:])])
            return part
        if ".qkv_proj." in name or ".gate_up_proj." in name:  # fused in the checkpoint (Phi-3): each part's slice
            fused = self.layers[0].self_attn.qkv_proj if ".qkv_proj." in name else None
            sizes = ([n * tp.size for n in fused.shard_sizes] if fused is not None else [tensor.shape[0] // 2] * 2)
            return torch.cat([part.narrow(0, tp.rank * (n // tp.size), n // tp.size)
                              for part, n in zip(tensor.split(sizes), sizes)])
        dim = next((d for piece, d in self._TP_SPLIT.items() if piece in name), None)
        if dim is None:
            return tensor
        per = tp.split(tensor.shape[dim], name)
        return tensor.narrow(dim, tp.rank * per, per)
