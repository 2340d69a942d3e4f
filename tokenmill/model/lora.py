"""LoRA adapters per request over one base model (punica / S-LoRA style): the base GEMM once for the whole batch,
then each adapter's low-rank update over its own tokens.

An adapter is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``) whose targets are the
decoder's linear layers (q/k/v/o, gate/up/down projections). On a mixture-of-experts model they may also be the
shared expert's projections and the routed experts': per-expert keys (``experts.N.gate_proj``, Mixtral's
``experts.N.w1`` / ``w3`` / ``w2``: adapters trained on transformers 4.x) or PEFT's ``target_parameters`` over the
fused 3-D expert parameters of transformers 5 (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I];
lora_A [r * E, in] expert-major, lora_B [out, r * E] rank-major, the keys nested as ``experts(.base_layer)*.lora_X``
without the parameter's name, so each is told apart by its shapes). Both read into per-expert factors; each expert
adds its rows' adapters' updates over its own rows (``ExpertLoraWeights``: the layer's rows are regrouped by expert,
so the step's runs of an adapter's rows are cut again per expert). The router is never adapted.

``attach_loras`` stacks every adapter's factors into each targeted layer (``LoraWeights``): for a layer with output
shards (q|k|v, gate|up) an adapter's ``A`` is its shards' A factors one under the other and its ``B``
block-diagonal, so a fused layer's update is still two GEMMs; the PEFT scaling (``lora_alpha / r``, or ``/ sqrt(r)``
with rsLoRA; per module where ``rank_pattern`` / ``alpha_pattern`` name it) is folded into B; adapters of lower rank
are zero-padded to the widest (zeros add nothing). The runner orders a step's requests by adapter (within its
decodes and within its prefills), so each adapter's tokens are at most two contiguous runs of rows
(``LoraSet.set_step``); every targeted layer then adds ``(x[a:b] A^T) B^T`` to its output rows ``a:b`` for each
run (views: no gather or scatter; measured 1.9x faster than gathering each adapter's rows and adding them back),
base-model rows get nothing. On the Triton family the runs are one grouped GEMM launch
for the shrink and one for the expand (added to the output in the kernel), whatever the number of adapters
(``kernels/triton/grouped.py``); routed experts' updates run per expert there too. On CPU runs of up to
``SHORT_RUN`` rows take one C++ call a layer instead (``LoraWeights``). The base weights may be quantized: the
update is added to whatever the base GEMM produced.

Invariants: slot 0 is the first adapter; a request without an adapter has no rows in any group; the adapter set is
fixed when the model is built (``max_loras`` bounds it), so the stacked tensors never change during a run.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj")  # the last two: Phi-3's fused layers, adapted as a whole
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
_MIXTRAL_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # transformers 4.x Mixtral experts' names
# PEFT target name -> (our layer, shard index: the rows it adapts; -1 = all of the layer's rows)
_FUSED = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
          "v_proj": ("self_attn.qkv_proj", 2), "qkv_proj": ("self_attn.qkv_proj", -1),
          "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
          "gate_up_proj": ("mlp.gate_up_proj", -1), "down_proj": ("mlp.down_proj", 0)}
_PREFIX = r"(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\."
_SUFFIX = r"\.lora_([AB])(?:\.[\w-]+)?\.weight"
# layer, module group, the shared or routed expert (None: attention or a dense MLP), target, A or B
_KEY = re.compile(_PREFIX + r"(self_attn|mlp|block_sparse_moe)\.(?:(shared_expert|experts\.\d+)\.)?(\w+)" + _SUFFIX)
# PEFT target_parameters over the fused experts: layer, the nesting (one wrapper per parameter), A or B
_FUSED_EXPERTS_KEY = re.compile(_PREFIX + r"(?:mlp|block_sparse_moe)\.experts((?:\.base_layer)*)" + _SUFFIX)


class LoraError(ValueError):
    pass


@dataclass
class LoraAdapter:
    """One PEFT adapter as read: ``factors[(layer, target)] = (A [r, in], B [out, r] with the scaling folded in)``."""

    name: str
    path: Path
    factors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The widest of its modules' ranks (``rank_pattern`` may give modules their own)."""
        return max((fa.shape[0] for fa, _ in self.factors.values()), default=0)


def read_adapter(name: str, path: str | Path, cfg) -> LoraAdapter:
    """Reads and checks one PEFT adapter directory (its rank, its targets, every tensor's shape) against the model's
    ``cfg`` (a ModelConfig: its layers, and on a mixture of experts the experts' count and shapes). The factors of
    experts are keyed ``experts.N.<target>`` and ``shared_expert.<target>``, Mixtral's w1 / w3 / w2 by their
    gate / up / down names."""
    path = Path(path).expanduser()
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise LoraError(f"LoRA adapter {name!r}: {path} has no adapter_config.json (a PEFT adapter directory)")
    acfg = json.loads(cfg_file.read_text())
    if acfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"LoRA adapter {name!r}: peft_type {acfg.get('peft_type')!r} is not LORA")
    for key, bad, what in (("use_dora", True, "DoRA"), ("fan_in_fan_out", True, "fan_in_fan_out weights")):
        if acfg.get(key) == bad:
            raise LoraError(f"LoRA adapter {name!r}: {what} is not supported")
    if acfg.get("bias", "none") != "none" or acfg.get("modules_to_save"):
        raise LoraError(f"LoRA adapter {name!r}: trained biases or modules_to_save are not supported (only the "
                        f"low-rank factors)")
    rank, alpha = int(acfg.get("r", 8)), float(acfg.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = acfg.get("rank_pattern") or {}, acfg.get("alpha_pattern") or {}
    for what, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict) or not all(isinstance(v, (int, float)) for v in pattern.values()):
            raise LoraError(f"LoRA adapter {name!r}: {what} must map module names or patterns to numbers")
        for key in pattern:
            try:
                re.compile(key)
            except re.error as e:
                raise LoraError(f"LoRA adapter {name!r}: {what} key {key!r} is not a regular expression ({e})")
    known = (*LORA_TARGETS, *_MIXTRAL_EXPERT)
    targets = acfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [t for t in known if re.fullmatch(targets, t) or re.search(rf"\b{t}$", targets)]
    unknown = sorted(set(targets) - set(known))
    if unknown:
        raise LoraError(f"LoRA adapter {name!r} targets {', '.join(unknown)}, which this model does not have as "
                        f"adaptable layers; tokenmill adapts {', '.join(LORA_TARGETS)}")
    params = acfg.get("target_parameters") or []
    # "mlp.experts.gate_up_proj", or the bare name (PEFT 0.22 converts target_modules gate_proj / up_proj /
    # down_proj of a transformers 5 MoE so: it matches the experts' parameters, a Linear's are named "weight")
    odd = sorted(p for p in params if p.rsplit(".", 1)[-1] not in ("gate_up_proj", "down_proj")
                 or ("." in p and "experts" not in p))
    if odd:
        raise LoraError(f"LoRA adapter {name!r}: target_parameters {', '.join(odd)}: tokenmill adapts the fused "
                        f"experts' gate_up_proj and down_proj parameters only")
    rslora = bool(acfg.get("use_rslora"))

    def shape_of(module: str) -> tuple[int, float]:
        """(rank, scaling) of one adapted module, named as PEFT names it in the base model
        (``model.layers.0.self_attn.q_proj``; a fused expert parameter ``model.layers.0.mlp.experts.gate_up_proj``)."""
        r = int(_pattern_value(rank_pattern, module, rank))
        a = float(_pattern_value(alpha_pattern, module, alpha))
        if r <= 0:
            raise LoraError(f"LoRA adapter {name!r}: {module} has rank {r}")
        return r, a / math.sqrt(r) if rslora else a / r
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoraError(f"LoRA adapter {name!r}: {path} has no adapter_model.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    # (layer, target) -> {"A": ..., "B": ..., "module": its name in the base model, as rank_pattern matches it}
    parts: dict[tuple[int, str], dict] = {}
    for key, t in tensors.items():
        module = re.sub(_SUFFIX + "$", "", key.removeprefix("base_model.model."))
        m = _FUSED_EXPERTS_KEY.fullmatch(key)
        if m is not None:
            if not cfg.num_experts or not params:
                why = "target_parameters does not name" if cfg.num_experts else "this model does not have"
                raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} adapts fused experts, which {why}")
            layer, target, ab = int(m.group(1)), f"fused{m.group(2)}", m.group(3)  # resolved by shape below
            module = re.sub(r"(\.base_layer)+$", "", module)  # the experts; the parameter's name comes with it
        else:
            m = _KEY.fullmatch(key)
            if m is None:
                raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} is not a decoder layer's lora_A / lora_B "
                                f"(tokenmill adapts {', '.join(LORA_TARGETS)}, and a mixture of experts' experts)")
            layer, group, expert, target, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5)
            if targets and target not in targets:
                raise LoraError(f"LoRA adapter {name!r}: factors for {target}, which target_modules does not name")
            if expert is not None and expert.startswith("experts."):
                target = _MIXTRAL_EXPERT.get(target, target)
                if int(expert.split(".")[1]) >= cfg.num_experts:
                    raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} adapts an expert this model does not have "
                                    f"({cfg.num_experts} experts a layer)")
            attention = group == "self_attn"
            if target not in LORA_TARGETS or attention != (target in _ATTENTION) or (attention and expert):
                raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} targets a layer this model does not have")
            if expert is not None:
                target = f"{expert}.{target}"
        if layer >= cfg.num_hidden_layers:
            raise LoraError(f"LoRA adapter {name!r}: tensor {key!r} targets a layer this model does not have")
        parts.setdefault((layer, target), {"module": module})[ab] = t.float()
    if not parts:
        raise LoraError(f"LoRA adapter {name!r}: adapter_model.safetensors holds no LoRA factors")
    adapter = LoraAdapter(name, path)
    for (layer, target), ab in sorted(parts.items()):
        if "A" not in ab or "B" not in ab:
            raise LoraError(f"LoRA adapter {name!r}: layer {layer} {target} has lora_{'A' if 'A' in ab else 'B'} "
                            f"only")
        a, b = ab["A"], ab["B"]
        if target.startswith("fused"):
            target_f, scaling, per_expert = _split_fused_experts(name, layer, a, b, ab["module"], shape_of, cfg)
            for e, (a_e, b_e) in enumerate(per_expert):
                key = (layer, f"experts.{e}.{target_f}")
                if key in adapter.factors:
                    raise LoraError(f"LoRA adapter {name!r}: layer {layer}'s experts' {target_f} adapted twice")
                adapter.factors[key] = (a_e, b_e * scaling)
            continue
        r, scaling = shape_of(ab["module"])
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            says = f"r={r}" if r == rank else f"r={r} for {ab['module']} (rank_pattern)"
            raise LoraError(f"LoRA adapter {name!r}: layer {layer} {target} has lora_A {tuple(a.shape)} and lora_B "
                            f"{tuple(b.shape)}, but its adapter_config says {says}")
        adapter.factors[(layer, target)] = (a, b * scaling)
    return adapter


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for ``rank_pattern`` / ``alpha_pattern`` (``peft.utils.other.get_pattern_key``): the value of the
    first key, in the config's order, that matches the end of the module's name from a dot on (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``, ``proj`` does not); ``default`` (``r`` / ``lora_alpha``) if none does."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _split_fused_experts(name: str, layer: int, a: torch.Tensor, b: torch.Tensor, module: str, shape_of, cfg):
    """PEFT's factors of one fused expert parameter (lora_A [r * E, in]: expert e's rows ``e * r:(e + 1) * r``;
    lora_B [out, r * E]: expert e's columns ``e, E + e, 2E + e, ...``) -> (the parameter, its scaling, per expert
    (A [r, in], B [out, r])). The parameter is told by the shapes: gate_up_proj takes the hidden size and gives 2 x the
    experts' intermediate size, down_proj the reverse (the two can never both fit); its rank and scaling are
    ``shape_of``'s for ``<module>.<parameter>`` (PEFT 0.22 gives a fused gate_up_proj converted from gate and up
    adapters rank 2r)."""
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    shapes = {(h, 2 * i): "gate_up_proj", (i, h): "down_proj"}
    target = shapes.get((a.shape[-1], b.shape[0])) if a.dim() == 2 and b.dim() == 2 else None
    rank, scaling = shape_of(f"{module}.{target or 'gate_up_proj'}")
    if target is None or a.shape[0] != rank * e or b.shape[1] != rank * e:
        up, down = (shape_of(f"{module}.{p}")[0] for p in ("gate_up_proj", "down_proj"))
        raise LoraError(f"LoRA adapter {name!r}: layer {layer}'s fused experts have lora_A {tuple(a.shape)} and "
                        f"lora_B {tuple(b.shape)}; with {e} experts of {h} -> {i} this model expects "
                        f"({up * e}, {h}) and ({2 * i}, {up * e}) for gate_up_proj (r={up}), or "
                        f"({down * e}, {i}) and ({h}, {down * e}) for down_proj (r={down})")
    a3 = a.reshape(e, rank, a.shape[1])  # [E, r, in]
    b3 = b.reshape(b.shape[0], rank, e)  # [out, r, E]
    return target, scaling, [(a3[x].contiguous(), b3[:, :, x].contiguous()) for x in range(e)]


GROUPED_BLOCK_M = 16  # rows per program of the Triton family's grouped updates
SHORT_RUN = 64  # runs of at most this many rows take the C++ kernel's row loop (lora_rows), longer ones two GEMMs


class LoraSet:
    """The engine's adapters (name -> slot) and the current step's token groups, shared by every targeted layer."""

    def __init__(self, names: list[str], grouped_device: torch.device | None = None) -> None:
        """``grouped_device``: the Triton family's device, where every layer's updates run as grouped GEMMs over the
        step's runs (``kernels/triton/grouped.py``), two launches a layer whatever the adapters."""
        self.slots = {n: i for i, n in enumerate(names)}
        self.groups: list[tuple[int, int, int]] = []  # (slot, first row, end row): runs of one adapter's rows
        # the same runs split for the C++ kernels, once a step: runs of at most SHORT_RUN rows as one flat
        # (slot, first, end) list for lora_rows, the longer ones (prefill chunks) for two GEMMs each
        self.short_runs: list[int] = []
        self.long_runs: list[tuple[int, int, int]] = []
        self.grouped_device = grouped_device
        self.blocks = None  # with grouped_device: the step's runs cut into the kernel's blocks, on the device

    def set_step(self, adapters: list[str | None], query_start_loc: list[int]) -> None:
        """The step's runs from each request's adapter (None: the base model) and its rows in the flat batch
        (request i: rows ``query_start_loc[i]:query_start_loc[i + 1]``); neighbours of one adapter make one run."""
        self.groups = []
        for i, name in enumerate(adapters):
            if name is None:
                continue
            slot, a, b = self.slots[name], query_start_loc[i], query_start_loc[i + 1]
            if self.groups and self.groups[-1][0] == slot and self.groups[-1][2] == a:
                self.groups[-1] = (slot, self.groups[-1][1], b)
            else:
                self.groups.append((slot, a, b))
        self.short_runs = [v for run in self.groups if run[2] - run[1] <= SHORT_RUN for v in run]
        self.long_runs = [run for run in self.groups if run[2] - run[1] > SHORT_RUN]
        if self.grouped_device is not None:
            from tokenmill.kernels.triton.grouped import run_blocks

            self.blocks = run_blocks(self.groups, GROUPED_BLOCK_M, self.grouped_device) if self.groups else None


class LoraWeights(torch.nn.Module):
    """One layer's stacked factors: ``a`` [num_adapters, R, in], ``b`` [num_adapters, out, R] (model dtype). With
    the C++ kernels (``kernels``), runs of at most ``SHORT_RUN`` rows (a step's decode rows of an adapter, small
    chunks) are updated in one ``lora_rows`` call for the layer, from ``a`` itself and ``bt`` [S, R, out] (B
    transposed, in the model's dtype: the kernel widens bfloat16 exactly as it loads, the float32 arithmetic of float32
    copies without holding them): two small GEMMs a run cost ~25 us each in bfloat16, mostly the call, which made four
    adapters' decode steps 1.7x slower than the base model's; longer runs (prefill chunks) stay GEMMs."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, loras: LoraSet, kernels=None) -> None:
        super().__init__()
        self.register_buffer("a", a.contiguous())
        self.register_buffer("b", b)
        self.loras = loras
        self.kernels = kernels  # the C++ module with lora_rows, or None
        if self.kernels is not None:
            self.register_buffer("bt", b.transpose(1, 2).contiguous())  # [S, R, out]; lora_rows reads A as it is

    @property
    def active(self) -> bool:
        return bool(self.loras.groups)

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [n, out] += (x[a:b] A^T) B^T over each run a:b of an adapter's rows; x [n, in]. Returns y."""
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        if self.loras.blocks is not None:  # Triton: the shrink over every run in one launch, the expand in another
            from tokenmill.kernels.triton.grouped import grouped_linear

            blocks = self.loras.blocks
            mid = grouped_linear(x2.contiguous(), None, self.a, blocks, GROUPED_BLOCK_M)  # [n, R]: runs' rows only
            grouped_linear(mid, None, self.b, blocks, GROUPED_BLOCK_M, out=y2, accumulate=True)
            return y
        groups = self.loras.groups
        if self.kernels is not None and y2.is_contiguous() and x2.dtype in (torch.float32, torch.bfloat16):
            if self.loras.short_runs:
                self.kernels.lora_rows(x2.contiguous(), y2, self.a, self.bt, self.loras.short_runs)
            groups = self.loras.long_runs
        for slot, a, b in groups:
            y2[a:b].addmm_(x2[a:b] @ self.a[slot].t(), self.b[slot].t())
        return y


class ExpertLoraWeights(torch.nn.Module):
    """A routed expert's stacked factors. The expert sees only its rows of the layer's rows regrouped by expert (in
    token order), so the step's runs of an adapter's rows do not apply; ``SparseMoE`` gives each expert's call its
    own (and clears them after). With the C++ kernels (``kernels``): ``runs`` (slot, first, end) in the expert's
    rows, all updated in one ``lora_rows`` call from the factors ``a`` [S, R, in] and ``bt`` [S, R, out] in the
    model's dtype, R x (in + out) multiply-adds a row whatever the number of adapters (``SparseMoE`` passes them to
    ``moe_experts_lora``, which makes those calls in its loop). Elsewhere (the Triton family; no C++ kernels):
    every adapter's update as two GEMMs over the expert's rows, the shrink against all adapters' A at once
    (``a_all`` [S * R, in]) masked to each row's adapter's R columns (``mask`` [rows, S * R], a view of one mask
    built for the layer's rows; zero rows for base-model rows), the expand against all adapters' B (``b_all`` [out,
    S * R]): a few launches a layer, S x R (in + out) multiply-adds a row. One MoE layer (8 experts of 768 -> 2,048,
    bfloat16, 4 adapters of rank 16, 64 tokens) measured 9 ms of updates as two GEMMs a run of rows, 3.9 masked,
    2.5 with ``lora_rows``. Only these factors are kept (an adapter of a large MoE's experts is hundreds of MB)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, kernels=None) -> None:
        """``a`` [S, R, in], ``b`` [S, out, R]: the stacked factors as ``LoraWeights`` takes them."""
        super().__init__()
        s, self.width = a.shape[0], a.shape[1]
        self.kernels = kernels  # the C++ module with lora_rows, or None
        self.runs: list[int] = []  # with kernels: the expert's runs, flat (slot, first, end) triples
        self.mask: torch.Tensor | None = None  # without: the mask of the expert's rows
        if self.kernels is not None:
            self.a = a.contiguous()  # [S, R, in]
            self.bt = b.transpose(1, 2).contiguous()  # [S, R, out]
        else:
            from tokenmill.model.gemm import pack

            self.a_all = pack(a.reshape(s * self.width, a.shape[2]), "onednn")  # [S * R, in]
            self.b_all = b.permute(1, 0, 2).reshape(b.shape[1], s * self.width).contiguous()  # [out, S * R]

    @property
    def active(self) -> bool:
        return bool(self.runs) or self.mask is not None

    def set_rows(self, given) -> None:
        """This step's rows for the expert's call (``SparseMoE._lora_rows``: its runs, or its masks by width); None
        after the call."""
        if self.kernels is not None:
            self.runs = given or []
        else:
            self.mask = None if given is None else given[self.width]

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y [n, out] += each row's adapter's (x A^T) B^T for the expert's rows x [n, in]. Returns y."""
        if self.kernels is not None:
            self.kernels.lora_rows(x.contiguous(), y, self.a, self.bt, self.runs)
            return y
        from tokenmill.model.gemm import linear

        return y.addmm_(linear(x, self.a_all).mul_(self.mask), self.b_all.t())


_ROW_PARALLEL = ("o_proj", "down_proj")  # under tensor parallelism: inputs split (the rest: outputs split)


def _site(target: str) -> tuple[str, str]:
    """The layer an adapter target lands on (``attach_loras``' site: q/k/v -> qkv_proj, gate/up -> gate_up_proj, under
    its expert prefix) and that layer's name in ``ModelConfig.linear_shapes``."""
    prefix, _, base = target.rpartition(".")
    ours = _FUSED[base][0].split(".")[-1]
    if not prefix:
        return ours, ours
    return f"{prefix}.{ours}", ("shared_expert_" if prefix == "shared_expert" else "expert_") + ours


def planned_lora_bytes(adapters: list[LoraAdapter], mc, dtype: torch.dtype, tp_size: int = 1,
                       transposed: bool = False) -> int:
    """The bytes ``attach_loras`` will hold for ``adapters`` (as ``read_adapter`` returns them), for a memory plan
    made before the model is built: per adapted layer S x R x (in + out) in the model's dtype (S adapters; R the
    widest adapter's total rank on the layer, the others zero-padded to it; in / out the layer's as
    ``ModelConfig.linear_shapes`` gives them), and B^T [S, R, out] more beside a dense layer's factors where the C++
    row loop reads it (``transposed``: on a CPU with the kernels). Under tensor parallelism each rank holds its part:
    a row-parallel layer's inputs, a column-parallel layer's outputs (``rank_factors``' cut)."""
    shapes = {name: (inp, out) for name, out, inp, _ in mc.linear_shapes()}
    width: dict[tuple[int, str, str], int] = {}  # (layer, site, its linear_shapes name) -> R
    for ad in adapters:
        mine: dict[tuple[int, str, str], int] = {}
        for (layer, target), (fa, _) in ad.factors.items():
            key = (layer, *_site(target))
            mine[key] = mine.get(key, 0) + fa.shape[0]
        for key, r in mine.items():
            width[key] = max(r, width.get(key, 0))
    total = 0
    for (_, site, name), r in width.items():
        inp, out = shapes[name]
        if site.endswith(_ROW_PARALLEL):
            inp //= tp_size
        else:
            out //= tp_size
        total += r * (inp + out * (2 if transposed and not site.startswith("experts.") else 1))
    return total * len(adapters) * torch.empty((), dtype=dtype).element_size()


def rank_factors(fa: torch.Tensor, fb: torch.Tensor, target: str, tp, shard_sizes: tuple[int, ...]):
    """This rank's part of one target's factors (A [r, in], B [out, r], full): a row-parallel layer's A by its input
    columns (each rank's (x_r A_r^T) B^T is a partial sum, added up by the layer's all-reduce with the base output),
    a column-parallel layer's B by its output rows (each fused part of Phi-3's qkv / gate_up its own slice, as the
    weights are cut: ``shard_sizes`` are the rank's sizes of the layer's parts)."""
    if tp.size == 1:
        return fa, fb
    if target in _ROW_PARALLEL:
        per = tp.split(fa.shape[1], f"{target}'s LoRA inputs")
        return fa.narrow(1, tp.rank * per, per), fb
    if target in ("qkv_proj", "gate_up_proj"):
        parts = fb.split([n * tp.size for n in shard_sizes])
        return fa, torch.cat([p.narrow(0, tp.rank * n, n) for p, n in zip(parts, shard_sizes)])
    per = tp.split(fb.shape[0], f"{target}'s LoRA outputs")
    return fa, fb.narrow(0, tp.rank * per, per)


def _sites(layer) -> list[tuple[str, list[tuple[str, int]], bool]]:
    """One decoder layer's adaptable Linears: (module path, [(adapter target, shard index)], is a routed expert).
    A dense MLP's targets are bare (gate_proj); a mixture of experts' are ``shared_expert.gate_proj`` and
    ``experts.N.gate_proj`` (its router is not adaptable)."""
    out = []
    for ours in ("self_attn.qkv_proj", "self_attn.o_proj"):
        out.append((ours, [(t, s) for t, (o, s) in _FUSED.items() if o == ours], False))
    mlp = layer.mlp
    subs = [("", False)]
    if hasattr(mlp, "experts"):  # model/moe.SparseMoE
        subs = [(f"experts.{e}.", True) for e in range(len(mlp.experts))]
        if mlp.shared_expert is not None:
            subs.insert(0, ("shared_expert.", False))
    for sub, routed in subs:
        for ours in ("mlp.gate_up_proj", "mlp.down_proj"):
            out.append((f"mlp.{sub}{ours[4:]}", [(sub + t, s) for t, (o, s) in _FUSED.items() if o == ours], routed))
    return out


def attach_loras(model, read: list[LoraAdapter]) -> LoraSet:
    """Gives every targeted layer of ``model`` the adapters' stacked factors (``Linear.lora``; a routed expert's
    Linears ``ExpertLoraWeights``, and its ``SparseMoE`` the LoraSet, by which it masks its rows per adapter);
    ``read``: the adapters as ``read_adapter`` returns them. Under tensor parallelism each rank takes its part
    (``rank_factors``). Factors for a layer the model does not have there (an MLP that is a mixture of experts, an
    expert of a dense layer) are one clear error."""
    dtype = model.activation_dtype  # the factors run beside the activations
    device = model.embed_tokens.weight.device
    loras = LoraSet([a.name for a in read], device if model.ops.name == "triton" else None)
    kernels = getattr(model.ops, "kernels", None) if device.type == "cpu" else None
    kernels = kernels if hasattr(kernels, "lora_rows") else None  # the C++ row loop for short runs
    used: set[tuple[int, str]] = set()
    for li, layer in enumerate(model.layers):
        for ours, shards, routed in _sites(layer):
            lin = layer.get_submodule(ours)
            sizes = lin.shard_sizes
            offsets = [sum(sizes[:i]) for i in range(len(sizes))]
            rows = {s: (0, lin.out_features) if s < 0 else (offsets[s], sizes[s]) for _, s in shards}
            per_adapter = []
            for ad in read:
                blocks = [(s, rank_factors(*ad.factors[(li, t)], t.rsplit(".", 1)[-1], model.tp, sizes))
                          for t, s in shards if (li, t) in ad.factors]
                per_adapter.append(blocks)
            used.update((li, t) for t, _ in shards)
            if not any(per_adapter):
                continue
            width = max(sum(ab[0].shape[0] for _, ab in blocks) for blocks in per_adapter)
            a = torch.zeros(len(read), width, lin.in_features)
            b = torch.zeros(len(read), lin.out_features, width)
            for i, (ad, blocks) in enumerate(zip(read, per_adapter)):
                col = 0
                for s, (fa, fb) in blocks:
                    r, (first, size) = fa.shape[0], rows[s]
                    if fa.shape[1] != lin.in_features or fb.shape[0] != size:
                        target = next(t for t, s2 in shards if s2 == s)
                        raise LoraError(f"LoRA adapter {ad.name!r}: layer {li} {target} has lora_A {tuple(fa.shape)} "
                                        f"and lora_B {tuple(fb.shape)}; this model's {target} takes "
                                        f"{lin.in_features} inputs and gives {size} outputs")
                    a[i, col:col + r] = fa
                    b[i, first:first + size, col:col + r] = fb
                    col += r
            a, b = a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)
            lin.lora = ExpertLoraWeights(a, b, kernels) if routed else LoraWeights(a, b, loras, kernels)
            if routed:
                layer.mlp.expert_loras = loras
                layer.mlp.expert_slots.update(i for i, blocks in enumerate(per_adapter) if blocks)
                layer.mlp.expert_lora_modules.append(lin.lora)
    for ad in read:
        for li, target in sorted(set(ad.factors) - used):
            sparse = hasattr(model.layers[li].mlp, "experts")
            if sparse and target in LORA_TARGETS:
                raise LoraError(f"LoRA adapter {ad.name!r} targets layer {li}'s MLP ({target}), which is a mixture "
                                f"of experts there: adapt its experts (experts.N.{target}, or target_parameters)")
            raise LoraError(f"LoRA adapter {ad.name!r} targets layer {li}'s {target}, which this model does not "
                            f"have ({'no shared expert' if sparse else 'a dense MLP there'})")
    model.loras = loras
    return loras
