"""Mixture-of-experts layers (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a router, top-k routing, the experts as a
grouped GEMM, and Qwen2-MoE's gated shared expert.

A MoE layer spends, per token, only its ``num_experts_per_tok`` experts' FLOPs of all ``num_experts``: seed 003's
lever. The experts run grouped (vLLM's fused-MoE shape): the (token, expert) pairs of a step are sorted by expert
(``group_by_expert``), the tokens gathered once into that order, so each expert's tokens are one contiguous run of
rows; each expert then runs one gate|up GEMM, SiLU-and-mul and one down GEMM over its run (experts no token chose
are skipped), the rows are scaled by their routing weights and summed back onto their tokens in one scatter-add. On a
CPU with the C++ kernels, float experts run that loop in one call (``moe_experts``: the GEMMs their Linears call,
oneDNN's on prepacked weights or the panel GEMM on AVX2-only CPUs; 7-11% faster a decode-sized layer than driving it
from Python), and so do w8a8 experts in
bfloat16 (``moe_experts_w8a8``: the rows quantized once, the same int8 GEMMs as the Linears) and int8 / int4
weight-only experts in the kernels' panels (``moe_experts_panels``: the panel GEMMs the Linears call); with the Triton
family, float experts run as two grouped GEMM launches and one SiLU-and-mul (``kernels/triton/moe.py``), their
weights built as views of one stacked [num_experts, out, in] tensor per projection, so nothing is copied.
LoRA adapters of the experts (model/lora.py) hang on each expert's Linears, each expert given its rows' adapters
(``_lora_rows``: its runs of one adapter's rows, or masks): on the C++ kernels a step holding adapter rows keeps one
call (``moe_experts_lora``, ``moe_experts_panels_lora``, ``moe_experts_w8a8_lora``: each expert's updates added in the
loop); elsewhere (the Triton family) it runs the experts one by one, their Linears adding the updates after their
GEMMs. Steps without adapter rows take the paths above.
Each expert is a dense ``MLP`` of ``Linear`` layers, so its weights are packed for the float path's GEMMs and
quantized exactly as the dense layers' are (int8, int4, w8a8, fp8: model/quant.py, model/fp8.py); the routers stay
in the model's float dtype (a few thousand weights a layer, and the choice of experts should not move with the
weights' rounding).

Under tensor parallelism every rank holds every expert's slice of the intermediate channels (as for a dense MLP):
the routing is the same on every rank (replicated router, same input), each rank's down GEMMs give partial sums, and
one all-reduce per layer adds them.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.layers import MLP, Build, Linear
from tokenmill.model.model_config import ModelConfig
from tokenmill.model.weight_only import Int4Weight, Int8Weight


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, num_experts] router logits -> (weights [n, top_k] float32, expert ids [n, top_k] int64): the softmax's
    ``top_k`` largest probabilities (in float32, as transformers computes them), rescaled to sum to 1 when
    ``renormalize``."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """[n, top_k] expert ids -> (order [n * top_k]: the flat (token, slot) pairs sorted by expert, stably, so each
    expert's pairs keep token order; counts: pairs per expert, ``num_experts`` ints summing to n * top_k).
    Pair ``order[j]`` belongs to token ``order[j] // top_k``; expert e's pairs are
    ``order[sum(counts[:e]):][:counts[e]]``."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host read: how long each run is
    return order, counts


def _stack(linears: list[Linear]) -> torch.Tensor:
    """One [len(linears), out, in] tensor whose rows the float Linears' weights become views of: loading writes through
    them. (On a GPU the loader's oneDNN repack leaves them alone; under the CPU interpreter it repacks copies the
    experts then never use: tests only.)"""
    first = linears[0]
    stacked = torch.empty(len(linears), first.out_features, first.in_features, dtype=first.weight.dtype,
                          device=first.weight.device)
    for i, lin in enumerate(linears):
        lin.weight = nn.Parameter(stacked[i], requires_grad=False)
    return stacked


class SparseMoE(nn.Module):
    """The routed experts of one layer (+ the shared expert where the model has one), in place of its MLP."""

    def __init__(self, cfg: ModelConfig, build: Build) -> None:
        super().__init__()
        self.tp = build.tp
        self.ops = build.ops
        # float experts on the C++ kernels run in one moe_experts call, w8a8 experts in one moe_experts_w8a8 call
        self.one_call = build.quantization == "none" and hasattr(build.ops.kernels, "moe_experts")
        self.w8a8_call = build.quantization == "w8a8" and hasattr(build.ops.kernels, "moe_experts_w8a8")
        self._w8a8 = None  # moe_experts_w8a8's weight operands, gathered on the first call (_w8a8_operands)
        # int8 / int4 weight-only experts in the C++ kernels' panels: one moe_experts_panels call
        self.panels_call = build.quantization in ("int8", "int4") and hasattr(build.ops.kernels, "moe_experts_panels")
        self._panels = None  # its weight operands, or False where the experts are not in panels (_panel_operands)
        self._lora_operands = None  # the *_lora expert calls' factors, or False where there are none (_lora_factors)
        self.expert_loras = None  # the LoraSet, where LoRA adapters adapt some expert (model/lora.attach_loras)
        self.expert_slots: set[int] = set()  # the adapters (slots) that adapt some expert of this layer
        self.expert_lora_modules: list = []  # the experts' lora.ExpertLoraWeights
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        floats = build.with_quantization("none")
        h = cfg.hidden_size
        self.gate = Linear(h, cfg.num_experts, False, floats)  # the router
        self.experts = nn.ModuleList(MLP(h, cfg.moe_intermediate_size, build) for _ in range(cfg.num_experts))
        self.stacked = None  # Triton family, float experts: (gate|up [E, 2I, h], down [E, h, I]) the experts' views
        if (build.ops.name == "triton" and build.quantization == "none" and self.experts[0].act == "silu"
                and build.weight_dtype is None):
            self.stacked = (_stack([e.gate_up_proj for e in self.experts]), _stack([e.down_proj for e in self.experts]))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size, build)
            self.shared_expert_gate = Linear(h, 1, False, floats)
        else:
            self.shared_expert = self.shared_expert_gate = None

    def _experts(self, xs: torch.Tensor, counts: list[int], lora_rows: list | None = None) -> torch.Tensor:
        """Each expert's MLP over its run of ``xs`` (rows grouped by expert, ``counts`` a expert). Float experts on the
        C++ kernels: one ``moe_experts`` call (the loop in C++, each GEMM the same oneDNN call the Linear makes); w8a8
        experts in bfloat16 there: one ``moe_experts_w8a8`` call (the same int8 kernels as the Linears); int8 / int4
        weight-only experts in the kernels' panels: one ``moe_experts_panels`` call; on the Triton family: grouped
        GEMMs over the stacked weights; otherwise each expert's MLP in turn. With LoRA adapters' rows in the step
        (``lora_rows``: ``_lora_rows``): float experts on the C++ kernels in one ``moe_experts_lora`` call, int8 / int4
        weight-only ones in one ``moe_experts_panels_lora`` call, w8a8 ones in one ``moe_experts_w8a8_lora`` call
        (each expert's updates added in the loop, as its Linears add them), else (the Triton family) each expert's
        MLP in turn, its Linears adding the updates."""
        if lora_rows is not None:
            factors = self._lora_factors() if xs.dtype in (torch.float32, torch.bfloat16) else None
            runs = [r or [] for r in lora_rows]
            if factors is not None and self.one_call:
                return self.ops.kernels.moe_experts_lora(
                    xs.contiguous(), counts, [e.gate_up_proj.weight for e in self.experts],
                    [e.down_proj.weight for e in self.experts], *factors, runs)
            if factors is not None and self.panels_call and self.experts[0].act == "silu":
                operands = self._panel_operands()
                if operands:
                    return self.ops.kernels.moe_experts_panels_lora(xs.contiguous(), counts, *operands, *factors, runs)
            if (factors is not None and self.w8a8_call and xs.dtype == torch.bfloat16
                    and self.experts[0].act == "silu"):
                operands = self._w8a8_operands()
                if operands is not None:
                    return self.ops.kernels.moe_experts_w8a8_lora(xs.contiguous(), counts, *operands, *factors, runs)
            return self._experts_loop(xs, counts, lora_rows)
        if self.stacked is not None:
            from tokenmill.kernels.triton.moe import fused_experts

            return fused_experts(xs.contiguous(), counts, *self.stacked)
        if self.one_call and xs.dtype in (torch.float32, torch.bfloat16):
            return self.ops.kernels.moe_experts(xs.contiguous(), counts, [e.gate_up_proj.weight for e in self.experts],
                                                [e.down_proj.weight for e in self.experts])
        if self.w8a8_call and xs.dtype == torch.bfloat16 and self.experts[0].act == "silu":
            operands = self._w8a8_operands()
            if operands is not None:
                return self.ops.kernels.moe_experts_w8a8(xs.contiguous(), counts, *operands)
        if self.panels_call and xs.dtype in (torch.float32, torch.bfloat16) and self.experts[0].act == "silu":
            operands = self._panel_operands()
            if operands:
                return self.ops.kernels.moe_experts_panels(xs.contiguous(), counts, *operands)
        return self._experts_loop(xs, counts)

    def _lora_factors(self) -> tuple | None:
        """The factor operands of the *_lora expert calls (moe_experts_lora, moe_experts_panels_lora,
        moe_experts_w8a8_lora): per expert its gate|up and down layers' (a, bt) (an empty tensor
        where no adapter adapts the layer), gathered once; None where the experts' adapters do not run on the C++
        kernels (the Triton family, no kernels)."""
        if self._lora_operands is None:
            empty = torch.empty(0)
            gate_up = [e.gate_up_proj.lora for e in self.experts]
            down = [e.down_proj.lora for e in self.experts]
            present = [lora for lora in gate_up + down if lora is not None]
            if not present or any(lora.kernels is None for lora in present):
                self._lora_operands = False
            else:
                def side(loras, name):
                    return [getattr(lora, name) if lora is not None else empty for lora in loras]

                self._lora_operands = (side(gate_up, "a"), side(gate_up, "bt"), side(down, "a"), side(down, "bt"))
        return self._lora_operands or None

    def _experts_loop(self, xs: torch.Tensor, counts: list[int], lora_rows: list | None = None) -> torch.Tensor:
        ys = torch.empty_like(xs)
        start = 0
        for e, (expert, count) in enumerate(zip(self.experts, counts)):
            if not count:
                continue
            adapted = [lin.lora for lin in (expert.gate_up_proj, expert.down_proj) if lin.lora is not None]
            if lora_rows is not None and lora_rows[e] is not None:
                for lora in adapted:
                    lora.set_rows(lora_rows[e])
            try:
                ys[start:start + count] = expert.partial(xs[start:start + count])
            finally:
                for lora in adapted:
                    lora.set_rows(None)
            start += count
        return ys

    def _lora_rows(self, token_of: torch.Tensor, counts: list[int], n: int, dtype: torch.dtype) -> list | None:
        """For the experts' LoRA updates (``lora.ExpertLoraWeights.set_rows``), per expert: with the C++ kernels
        its runs of one adapter's rows, flat (slot, first, end) triples in its own rows (the step's runs cut at the
        experts' boundaries: an expert's rows keep token order); without, a dict factor width R -> the mask of its
        rows [count, S * R] (row i's slot's R columns 1, the rest 0); None for an expert with no adapter row. None
        when no adapter of these experts is in the step."""
        groups = [g for g in self.expert_loras.groups if g[0] in self.expert_slots] if self.expert_loras else []
        if not groups:  # no row of an adapter of these experts: the experts' usual path
            return None
        slot_of = torch.full((n,), -1, dtype=torch.int64, device=token_of.device)
        for slot, a, b in groups:
            slot_of[a:b] = slot
        rows = slot_of.index_select(0, token_of)  # [n * top_k]: each grouped row's adapter slot
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        if self.expert_lora_modules[0].kernels is not None:
            rows = rows.cpu()
            cut = torch.ones(len(rows), dtype=torch.bool)
            cut[1:] = rows[1:] != rows[:-1]
            cut[[st for st, c in zip(starts, counts) if c]] = True  # every expert's first row starts a run
            firsts = cut.nonzero().flatten().tolist()
            runs: list[list[int]] = [[] for _ in counts]
            e = 0
            for first, end, slot in zip(firsts, [*firsts[1:], len(rows)], rows[firsts].tolist()):
                while first >= starts[e + 1]:
                    e += 1
                if slot >= 0:
                    runs[e] += (slot, first - starts[e], end - starts[e])
            return [r or None for r in runs]
        seen = torch.zeros(len(rows) + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(rows >= 0, 0, out=seen[1:])  # seen[i]: adapter rows among the first i
        bounds = torch.tensor(starts, device=rows.device)
        any_row = (seen[bounds[1:]] > seen[bounds[:-1]]).tolist()  # one host read
        masks = {}
        for width in {lora.width for lora in self.expert_lora_modules}:
            cols = torch.arange(len(self.expert_loras.slots) * width, device=rows.device) // width  # column -> slot
            masks[width] = (rows[:, None] == cols[None, :]).to(dtype)
        return [{w: m[a:b] for w, m in masks.items()} if hit else None
                for a, b, hit in zip(starts, starts[1:], any_row)]

    def _w8a8_operands(self) -> tuple | None:
        """moe_experts_w8a8's weight operands (each expert's packed gate|up and down weights, their code sums and
        scales, and whether to use AMX), gathered once: the weights never change after loading. None where the
        experts are not in the C++ kernels' layout (the Python loop then runs)."""
        if self._w8a8 is None:
            gu = [e.gate_up_proj.quantized for e in self.experts]
            down = [e.down_proj.quantized for e in self.experts]
            if not all(w.packed is not None for w in gu + down):
                return None
            self._w8a8 = ([w.packed for w in gu], [w.comp for w in gu], [w.scale for w in gu],
                          [w.packed for w in down], [w.comp for w in down], [w.scale for w in down], gu[0].amx)
        return self._w8a8

    def _panel_operands(self) -> tuple | bool:
        """moe_experts_panels' operands (each expert's gate|up and down panels and their scales, whether the GEMMs
        take bfloat16 input, and the kernel: 0 int8g_gemm, 1 its AMX form, 2 int4g_gemm_amx), gathered once. False
        where some expert is not in the panels (the torch kernels' layouts, GPTQ act-order's input permutation,
        int8 experts of different input dtypes): the Python loop then runs."""
        if self._panels is None:
            ws = [w for e in self.experts for w in (e.gate_up_proj.quantized, e.down_proj.quantized)]
            self._panels = False
            if all(isinstance(w, Int8Weight) and w.packed is not None and w.x_dtype == ws[0].x_dtype for w in ws):
                packed, scales = [w.packed for w in ws], [w.scales for w in ws]
                kind = 1 if ws[0].amx else 0
                x_bf16 = ws[0].x_dtype == torch.bfloat16
            elif all(isinstance(w, Int4Weight) and w.panels is not None and w.perm is None for w in ws):
                packed, scales = [w.panels for w in ws], [w.panel_scales for w in ws]
                kind, x_bf16 = 2, True
            else:
                return self._panels
            self._panels = (packed[0::2], scales[0::2], packed[1::2], scales[1::2], x_bf16, kind)
        return self._panels

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual + MoE(x) for x, residual [n, hidden] (under TP: rank 0 adds the residual, then the ranks' sum).
        The experts' contributions are summed in float32."""
        n, hidden = x.shape
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)  # [n, top_k] each
        order, counts = group_by_expert(ids, self.num_experts)
        token_of = order // self.top_k  # [n * top_k]: each sorted pair's token
        xs = x.index_select(0, token_of)  # [n * top_k, hidden]: each expert's tokens one contiguous run
        ys = self._experts(xs, counts, self._lora_rows(token_of, counts, n, x.dtype))  # [n * top_k, hidden]
        scaled = ys.float().mul_(weights.reshape(-1).index_select(0, order)[:, None])  # [n * top_k, hidden]
        out = torch.zeros(n, hidden, dtype=torch.float32, device=x.device).index_add_(0, token_of, scaled)
        if self.shared_expert is not None:
            shared = self.shared_expert.partial(x).float()
            out += torch.sigmoid(self.shared_expert_gate(x).float()) * shared
        if self.tp.size == 1:
            return residual + out.to(x.dtype)
        partial = (out + residual.float()).to(x.dtype) if self.tp.rank == 0 else out.to(x.dtype)
        return self.tp.all_reduce(partial)
