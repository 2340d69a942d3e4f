"""Weight-only quantization: int8 and int4 weights, float activations (``make_quantized_weight("int8" | "int4",
...)``; the common part is in ``model/quant.py``).

- ``int8``: int8 weight-only, in groups of 32 along K with a float16 scale and offset each, ``w = q * scale +
  offset``: asymmetric codes spanning each group's minimum to its maximum (``quantize_int8_groups``). GGUF's Q8_0
  blocks are the case offset = 0, so a Q8_0 file loads without rounding (``Int8Groups``). The rows are written
  straight into the panels of the C++ kernels' ``int8g_gemm`` as they load. Activations stay float: on a CPU with
  AVX512-BF16 they are multiplied in bfloat16 with the codes, widened to bfloat16 in the kernel (exact), each group's
  float32 sum scaled once and the offset times the input's group sum added (on a CPU with AMX, ``int8g_gemm_amx``:
  each panel dequantized to bfloat16 weights, one rounding per weight as oneDNN's and OpenVINO's weight decompression
  do, then tile products over all of K; several times faster); elsewhere the kernel's portable path
  dequantizes a panel of 32 channels at a time to float32 and multiplies the float32 input. Without the C++ kernels
  (no compiler) the rows are quantized symmetrically per output channel for ``torch._weight_int8pack_mm`` (a Q8_0
  file's groups requantized: a rounding). A little over half of bf16's weight bytes.
- The weight-only kernels multiply in bfloat16 (int8's on a CPU with AVX512-BF16): in a float32 model the layer's
  input is rounded to bfloat16 (torch's float32 weight-only paths run ~40x slower here, measured).
- ``int4``: 4-bit weights in groups of 32 along K with a scale and a zero per group, ``w = (q - 8) * scale + zero``
  (``torch._weight_int4pack_mm_for_cpu``). GGUF's Q4_0, Q4_1 and Q4_K blocks are exactly this form, so those files
  load without any rounding (``Int4Groups``, from ``model/gguf_weights.py``). A quarter of bf16's weight bytes. On a
  CPU with AMX the same bytes go through an AMX GEMM instead (``Int4Weight``, ``int4g_gemm_amx``).
"""

from __future__ import annotations

import torch

from tokenmill.model.quant import (INT4_GROUP_SIZE, INT8_GROUP_SIZE, Int4Groups, Int8Groups, QuantizedWeight,
                                   add_bias_residual, as_dtype, quantize_int4_groups, quantize_int8_groups,
                                   quantize_int8_rows, to_float)


def _weight_only_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the weight-only kernels multiply in: bfloat16 for a float32 model (see the module docstring)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype


INT8_PANEL = 32  # int8g_gemm's output channels per panel


def write_int8_panels(packed: torch.Tensor, scales: torch.Tensor, offset: int, groups: Int8Groups) -> None:
    """Rows ``offset:offset + len(groups)`` of a weight into int8g_gemm's layout, in place: ``packed`` [P, K/2, 32, 2]
    int8 (row n is channel n % 32 of panel n // 32; codes k and k + 1 adjacent) and ``scales`` [P, K/32, 2, 32]
    float16 (each group's 32 scales, then its 32 offsets)."""
    codes = packed.permute(0, 2, 1, 3)  # [P, 32, K/2, 2], a view
    sview = scales.permute(0, 3, 1, 2)  # [P, 32, G, 2], a view
    o = groups.offset if groups.offset is not None else torch.zeros_like(groups.scale)
    q, s = groups.q, torch.stack([groups.scale, o], dim=2).half()  # [N, G, 2]
    k = q.shape[1]
    row, end = offset, offset + q.shape[0]
    while row < end:
        p, c = divmod(row, INT8_PANEL)
        if c == 0 and end - row >= INT8_PANEL:  # whole panels: one copy
            n = (end - row) // INT8_PANEL * INT8_PANEL
            rows = slice(row - offset, row - offset + n)
            codes[p:p + n // INT8_PANEL] = q[rows].reshape(-1, INT8_PANEL, k // 2, 2)
            sview[p:p + n // INT8_PANEL] = s[rows].reshape(-1, INT8_PANEL, s.shape[1], 2)
        else:  # part of one panel
            n = min(end - row, INT8_PANEL - c)
            rows = slice(row - offset, row - offset + n)
            codes[p, c:c + n] = q[rows].reshape(n, k // 2, 2)
            sview[p, c:c + n] = s[rows]
        row += n


def pack_int8_groups(groups: Int8Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8Groups [N, K] -> (packed [ceil(N / 32), K / 2, 32, 2] int8, scales [ceil(N / 32), K / 32, 2, 32] float16),
    int8g_gemm's operands (channels past N zero)."""
    n, k = groups.shape
    panels = -(-n // INT8_PANEL)
    packed = torch.zeros(panels, k // 2, INT8_PANEL, 2, dtype=torch.int8)
    scales = torch.zeros(panels, k // INT8_GROUP_SIZE, 2, INT8_PANEL, dtype=torch.float16)
    write_int8_panels(packed, scales, 0, groups)
    return packed, scales


def pack_int4_panels(groups: Int4Groups) -> tuple[torch.Tensor, torch.Tensor]:
    """Int4Groups [N, K] -> (packed [ceil(N / 32), K / 2, 32] uint8, scales [ceil(N / 32), K / 32, 2, 32] float16),
    int4g_gemm_amx's operands: int8g_gemm's panels (pack_int8_groups of the groups as int8 codes q - 8 with offset
    ``zero``) with a channel's codes k = 2j and 2j + 1 as the low and the high nibble of one byte."""
    packed8, scales = pack_int8_groups(Int8Groups(groups.q.to(torch.int8) - 8, groups.scale, groups.zero))
    q = (packed8 + 8).to(torch.uint8)  # [P, K/2, 32, 2]; channels past N: code 8, zero scale
    return (q[..., 0] | (q[..., 1] << 4)).contiguous(), scales


class Int8Weight(QuantizedWeight):
    """Where the C++ kernels load and the activations are float32 or bfloat16: ``packed`` / ``scales`` in
    ``int8g_gemm``'s panels of 32 channels, written as the rows load (no staging copy, so a model never holds more
    than its packed weights and one checkpoint tensor); the input goes in as bfloat16 on a CPU with AVX512-BF16, as
    float32 elsewhere (the kernel's portable path). Without the kernels (no C++ compiler) the rows are quantized per
    channel as they load (float rows once; Q8_0 groups requantized) for ``torch._weight_int8pack_mm``: ``qweight``
    [N, K] and ``scale`` [N]."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        if in_features % INT8_GROUP_SIZE:
            raise ValueError(f"int8 needs in_features to be a multiple of {INT8_GROUP_SIZE}, got {in_features}")
        groups, panels = in_features // INT8_GROUP_SIZE, -(-out_features // INT8_PANEL)
        self.register_buffer("packed", None)  # [ceil(N / 32), K / 2, 32, 2] int8, on the kernel path
        self.register_buffer("scales", None)  # [ceil(N / 32), K / 32, 2, 32] float16 (scales, offsets), kernel path
        self.register_buffer("qweight", None)  # [N, K] int8, on the torch path
        self.register_buffer("scale", None)  # [N] (float32 while loading, then the kernel's dtype), on the torch path
        self.x_dtype: torch.dtype | None = None  # the kernel path's input dtype, set by finalize
        if self.kernels is not None:
            self.packed = torch.zeros(panels, in_features // 2, INT8_PANEL, 2, dtype=torch.int8)
            self.scales = torch.zeros(panels, groups, 2, INT8_PANEL, dtype=torch.float16)
        else:
            self.qweight = torch.empty(out_features, in_features, dtype=torch.int8)
            self.scale = torch.empty(out_features, dtype=torch.float32)

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        if self.packed is not None:
            groups = w if isinstance(w, Int8Groups) else quantize_int8_groups(to_float(w))
            write_int8_panels(self.packed, self.scales, offset, groups)
        else:
            q, s = quantize_int8_rows(to_float(w))
            self.qweight[offset:offset + q.shape[0]], self.scale[offset:offset + q.shape[0]] = q, s

    def finalize(self, dtype: torch.dtype) -> None:
        if self.packed is not None:
            if dtype in (torch.float32, torch.bfloat16):
                # the input's dtype for int8g_gemm, decided once: bfloat16 where the CPU has AVX512-BF16
                self.x_dtype = torch.bfloat16 if self.kernels.int8g_bf16_available() else torch.float32
                return
            # int8g_gemm takes float32 or bfloat16 activations: in another dtype the groups go per channel (one
            # layer's float copy at a time)
            self.qweight, self.scale = quantize_int8_rows(self.groups().dequantize())
            self.packed = self.scales = None
        self.scale = self.scale.to(_weight_only_dtype(dtype))  # torch's kernel takes its input's dtype

    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        if self.packed is not None:
            self.packed.random_(-127, 128, generator=generator)  # channels past N too: the kernel never stores them
            self.scales[:, :, 0].fill_(1e-3 / 127)  # offsets zero
        else:
            self.qweight.random_(-127, 128, generator=generator)
            self.scale.fill_(1e-3 / 127)
        self.finalize(dtype)

    def groups(self) -> Int8Groups:
        """The weight as int8 groups again (from the packed panels; on the torch path, its per-channel rows as groups
        with one scale per row)."""
        if self.packed is None:
            return Int8Groups(self.qweight, self.scale.float()[:, None].expand(-1, self.in_features // INT8_GROUP_SIZE))
        n, k = self.out_features, self.in_features
        q = self.packed.permute(0, 2, 1, 3).reshape(-1, k)[:n]  # [P, K/2, 32, 2] -> [P * 32, K]
        so = self.scales.permute(0, 3, 1, 2).reshape(-1, k // INT8_GROUP_SIZE, 2)[:n].float()  # [P, G, 2, 32] -> [N, G, 2]
        return Int8Groups(q, so[..., 0], so[..., 1])

    def column_absmax(self) -> torch.Tensor:
        """max |W[:, j]| of the dequantized weight: [in_features] float32 (SmoothQuant's weight statistic)."""
        return self.groups().dequantize().abs().amax(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.packed is not None:
            gemm = self.kernels.int8g_gemm_amx if self.amx else self.kernels.int8g_gemm  # same operands
            return _panel_gemm(gemm, x, self.x_dtype, self.packed, self.scales, bias, residual, self.out_features)
        xc = x.reshape(-1, self.in_features).to(self.scale.dtype)
        y = torch._weight_int8pack_mm(xc, self.qweight, self.scale).to(x.dtype)  # [M, N]
        return add_bias_residual(y, bias, residual).reshape(*lead, self.out_features)


class Int4Weight(QuantizedWeight):
    """Staged as one uint8 per weight while loading (the packed layout tiles rows, so shards cannot be packed alone);
    ``finalize`` packs to two weights per byte for ``torch._weight_int4pack_mm_for_cpu`` and frees the staging.

    On a CPU with AMX (``amx``), in a float32 or bfloat16 model, the same groups go instead into ``int8g_gemm``'s
    panels of 32 channels with two 4-bit codes per byte (``pack_int4_panels``; the same bytes as torch's layout) and
    its float16 scales and offsets (``w = (q - 8) * scale + zero``: the offset is ``zero``), multiplied by
    ``int4g_gemm_amx``: each panel dequantized to bfloat16 once per task, then AMX tile products, as int8
    weight-only's AMX GEMM (4-10x torch's int4 kernel on the model's shapes; BENCHMARKS.md). float16 holds the scales to 11 significant
    bits where torch's kernel takes bfloat16's 8; a weight with a scale float16 cannot hold to that precision (a
    nonzero magnitude below 2^-14 or above 65504) keeps torch's kernel."""

    def __init__(self, out_features: int, in_features: int, kernels=None, amx: bool = False) -> None:
        super().__init__(out_features, in_features, kernels, amx)
        if in_features % INT4_GROUP_SIZE:
            raise ValueError(f"int4 needs in_features to be a multiple of {INT4_GROUP_SIZE}, got {in_features}")
        groups = in_features // INT4_GROUP_SIZE
        self._q = torch.empty(out_features, in_features, dtype=torch.uint8)  # staging, [N, K]
        self._scale = torch.empty(out_features, groups, dtype=torch.float32)
        self._zero = torch.empty(out_features, groups, dtype=torch.float32)
        self.register_buffer("packed", None)  # [N, K / 2] uint8 once final (torch's int4 kernel)
        self.register_buffer("scales_and_zeros", None)  # [K / 32, N, 2] in the kernel's dtype once final
        self.register_buffer("panels", None)  # [ceil(N / 32), K / 2, 32] uint8 (two codes a byte), on the AMX path
        self.register_buffer("panel_scales", None)  # [ceil(N / 32), K / 32, 2, 32] float16, on the AMX path
        self.register_buffer("perm", None)  # [K] int64: the input's columns in the weight's order (GPTQ act-order)
        self._rows_loaded = 0

    def load_rows(self, offset: int, w: torch.Tensor | Int4Groups | Int8Groups) -> None:
        """Rows of the weight; Int4Groups load as they are. Every shard of a fused layer must have the same input
        permutation (none, or GPTQ act-order's: they share one input)."""
        groups = w if isinstance(w, Int4Groups) else quantize_int4_groups(to_float(w))
        perm = groups.perm
        if self._rows_loaded and ((perm is None) != (self.perm is None)
                                  or (perm is not None and not torch.equal(perm, self.perm))):
            raise ValueError("the checkpoint tensors fused into one layer have different input channel orders "
                             "(act-order g_idx): they cannot share one input")
        self.perm = perm
        rows = slice(offset, offset + groups.q.shape[0])
        self._q[rows], self._scale[rows], self._zero[rows] = groups.q, groups.scale, groups.zero
        self._rows_loaded += groups.q.shape[0]

    def _float16_holds(self) -> bool:
        """Whether float16 holds the groups at least as well as bfloat16: every scale 0 or a normal float16 (11
        significant bits), every zero within float16's range (a zero below its normal range is off by at most 2^-25,
        under 1/1000 of the smallest such step)."""
        s, z = self._scale.abs(), self._zero.abs()
        return bool(((s == 0) | ((s >= 2.0**-14) & (s <= 65504))).all() and (z <= 65504).all())

    def finalize(self, dtype: torch.dtype) -> None:
        if (self.amx and self.kernels.amx_available() and dtype in (torch.float32, torch.bfloat16)
                and self._float16_holds()):
            self.panels, self.panel_scales = pack_int4_panels(Int4Groups(self._q, self._scale, self._zero))
        else:
            self.packed = torch._convert_weight_to_int4pack_for_cpu(self._q.to(torch.int32), 1)
            self.scales_and_zeros = torch.stack([self._scale.t(), self._zero.t()], dim=-1).to(
                _weight_only_dtype(dtype)).contiguous()
        del self._q, self._scale, self._zero

    def init_dummy(self, generator: torch.Generator, dtype: torch.dtype) -> None:
        self._q.copy_(torch.randint(0, 16, self._q.shape, generator=generator, dtype=torch.uint8))
        self._scale.fill_(1e-3 / 8)
        self._zero.zero_()
        self.finalize(dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.panels is not None:
            return _panel_gemm(self.kernels.int4g_gemm_amx, x, torch.bfloat16, self.panels, self.panel_scales, bias,
                               residual, self.out_features)
        xc = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        y = torch._weight_int4pack_mm_for_cpu(xc, self.packed, INT4_GROUP_SIZE, self.scales_and_zeros)  # [M, N]
        y = y.to(x.dtype)
        return add_bias_residual(y, bias, residual).reshape(*lead, self.out_features)


def _panel_gemm(gemm, x: torch.Tensor, x_dtype: torch.dtype, packed: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, residual: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """The C++ panel GEMMs' call (int8g_gemm, int8g_gemm_amx, int4g_gemm_amx): x [..., K] in x_dtype times the packed
    weight, bias and residual added in the kernel, out in x's dtype [..., N]."""
    x2 = x.reshape(-1, x.shape[-1]).to(x_dtype).contiguous()  # [M, K]
    y = torch.empty(x2.shape[0], out_features, dtype=x.dtype)
    res = None if residual is None else residual.reshape(-1, out_features)
    gemm(x2, packed, scales, as_dtype(bias, x.dtype), as_dtype(res, x.dtype), y)
    return y.reshape(*x.shape[:-1], out_features)
