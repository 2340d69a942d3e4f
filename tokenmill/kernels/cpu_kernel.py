"""C++ CPU kernels, compiled once per machine: paged attention over the KV cache (prefill on AMX tiles where the CPU
has them), attention over packed sequences with no cache (embeddings), RMSNorm for bf16/fp16, w8a8's int8 GEMM and
the passes around it, and int8 weight-only's grouped GEMM.

``paged_attention`` runs every token of a step (decodes and prefill chunks, each with its causal offset) in one call.
The torch path gathers every decoding sequence's K and V into padded dense tensors (a copy of the whole context per
layer per step) and prefills one request at a time; this kernel reads the cache in place through the block table,
one query token per task, threads split by the number of keys read. Each block's token rows (all KV heads,
contiguous) are read once per pass and shared by the query heads of each KV group (GQA), with the next blocks
prefetched (two blocks ahead, K and V together). It computes in float32 whatever the cache dtype (the model's, or
float8 e4m3 for ``kv_cache_dtype="fp8"``, converted exactly), 16 lanes at a time (GCC/Clang vector extensions:
AVX-512 here, narrower registers elsewhere), with a vectorisable exp in the softmax. On AVX-512 or AVX2 with head_dim
32, 64 or 128 (``attend_simd``) each head scores 16 (AVX2: 8) K rows at a time (their products summed across lanes
together, not one horizontal sum per row) and V rows are widened in registers once per KV group for a register block
of its heads.
(Measurements: BENCHMARKS.md.)

``varlen_attention`` is the embedding path's attention: many sequences packed end to end, each attending to itself
(bidirectional for encoders, causal for decoder embedding models), one task per (sequence, KV head) with K held
transposed so the scores are broadcast-FMAs over 16 keys, RB query rows sharing every K/V load; the whole batch is
one call instead of one SDPA call per distinct length.

``rms_norm`` is one pass per row instead of ~7 torch ops, bit-equal to them in bf16/fp16 (in float32 within a few
ulps: the sum of squares is added in another order).

``quantize_rows_int8`` (per-token asymmetric 8-bit activations, bit-equal to the torch ops) and ``int8_epilogue``
(int32 GEMM result times the token and channel scales, plus the activations' zero-point term, bias and residual,
rounded once) are one pass each instead of 4-6 torch ops with as many temporaries (model/quant.py). Where the CPU has
AVX512-VNNI, w8a8 skips both torch._int_mm and the separate epilogue: ``int8_pack_weight`` packs each weight once
into panels of 64 channels, and ``int8_gemm`` multiplies the activations' unsigned codes (``quantize_rows_uint8``)
with VNNI's u8 x s8 dot products, takes off 128 x each channel's code sum, and applies the epilogue in registers
before its one store (``int8_gemm_available()`` says whether this build has it). ``int8_gemm_amx`` takes the same
operands to AMX-INT8 tiles (the packed panels are already tdpbusd's B tiles; 8 rows or more, K a multiple of 64;
``int8_gemm`` otherwise), equal to it bit for bit (``cpu_amx.cpp``; ``amx_int8_available()`` says whether it can).
``int8_gemm_argmax`` is the same GEMM reduced to each row's argmax on the way out: a greedy step's w8a8 LM head,
whose float32 logits are then never written. ``moe_experts_w8a8`` is ``moe_experts``' loop for w8a8 experts (the
rows' codes computed once, then per expert the int8 GEMMs and the fused SiLU-and-mul quantization).

``lora_rows`` adds LoRA adapters' updates to short runs of rows, each run's rows under its own adapter, in one call
(model/lora.py: a step's decode rows of each adapter, each expert's runs in a mixture of experts), from the stacked
factors in the model's dtype (bfloat16 widened exactly as it loads): rows in blocks of 8, their dot products with A
16 lanes wide, then 4 rows x 64 outputs held in registers while B's rows stream past; where two small GEMMs a run
cost ~25 us each in bfloat16. ``moe_experts_lora``, ``moe_experts_panels_lora`` and ``moe_experts_w8a8_lora`` are
``moe_experts``, ``moe_experts_panels`` and ``moe_experts_w8a8`` with each expert's ``lora_rows`` updates in their
loops (a step with adapter rows keeps one call a layer).

``int8g_gemm`` is int8 weight-only's GEMM: int8 codes with a float16 scale and offset per 32 weights along K (``w = q *
scale + offset``; GGUF's Q8_0 blocks have offset 0), in panels of 32 channels (packed as the rows load:
``model/quant.py``). With bfloat16 input (AVX512-BF16; ``int8g_bf16_available()``) each task widens its panel's codes
to bfloat16 once (exact), vdpbf16ps sums a group's products in float32, and per group one fma applies the scales and
one adds the offsets times the input's sum over the group. With float32 input (any CPU: the portable path) each task
dequantizes its panel to float32 and runs a float GEMM. Bias and residual are added before the store.

``int8g_gemm_amx`` is ``int8g_gemm`` on AMX tiles (each panel dequantized to bfloat16 weights once per task, then
tile products over K), and ``int4g_gemm_amx`` the same over int4 panels (two 4-bit codes a byte, ``w = (q - 8) *
scale + offset``), AMX hosts only (``cpu_amx.cpp``). ``moe_experts_panels`` is ``moe_experts``' loop for int8 / int4
weight-only experts over these panel GEMMs.

``paged_attention_tiled`` is ``paged_attention`` with the prefill tokens of requests with at least ``min_q`` new
tokens in the step attended in tiles of 16 query tokens per request and KV head (``cpu_prefill.cpp``): the keys a tile
sees converted once to float K^T and V (kept by a thread across a request's successive tiles), the scores and P V as
register-blocked broadcast-FMAs shared by several query rows (``varlen_attention``'s inner loops), where the per-token
kernel reads every key row once per query token and sums each score across the lanes; with AVX-512 at head_dim 16 /
32 / 64 / 128 / 256 the tile's 16 query rows are a vector's 16 lanes (scores, softmax and P V down the lanes, K and V
broadcast from float rows). Any CPU, any cache dtype.

``paged_attention_amx`` is ``paged_attention`` with the prefill tokens of long-enough requests attended on AMX tiles
(AMX-BF16: bfloat16 queries over a bfloat16 or fp8 cache, or float32 queries over an fp8 cache; head_dim 32 / 64 / 128
/ 256), in tiles of 16 query tokens per request and KV group: S = Q K^T and P V as tile products, the softmax on
AVX-512 between them (``cpu_amx.cpp``; with bfloat16 queries P is rounded to bfloat16 before P V, as flash attention
does on GPUs; float32 queries and probabilities go through the tiles as three bfloat16 parts each, exact products
with the fp8 cache's bfloat16-exact rows, so float32 attention in another summation order). ``amx_available()`` says
whether this build targets a CPU with AMX and the OS granted the process the tile state; elsewhere the function is
``paged_attention_tiled``. The ops object decides once whether to call it (``ops/cpu_ops.py``).

The C++ sources beside this file, one kernel family each (``cpu_common.cpp``: the shared vector helpers;
``cpu_attention.cpp``, ``cpu_layers.cpp``: norms, RoPE, argmax, the MLP activation, the MoE loop, the sampler's
draws; ``cpu_int8.cpp``;
``cpu_prefill.cpp``; ``cpu_amx.cpp``; ``cpu_gemm.cpp``: float GEMMs on AVX2-only CPUs, ``panel_gemm`` over weights
in panels of 16 output channels, ``model/gemm.py``'s "panels" path), are joined in that order and compiled as one
module. It is compiled
(``-march=native``, needs a C++ compiler and ninja) once per machine and the shared library is kept under
``~/.cache/tokenmill/kernels/`` (``XDG_CACHE_HOME`` honoured), keyed on what decides the binary: the source, the
flags, the CPU model and features, torch and Python (the outer directory) and the compiler's version (the inner one).
Later processes load the cached library directly: which ninja is on PATH plays no part. The first build is announced
on stderr; a failed build is reported once as a warning saying what is missing and what it costs, and the torch path
is used (``tests/model/test_cpu_kernel.py`` holds the two equal). ``tokenmill build-kernels`` builds ahead of time
(for images and CI).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# the C++ sources, shipped as package data; compiled as one module, in this order (later files use earlier ones)
_SOURCE_FILES = [Path(__file__).with_name(n) for n in ("cpu_common.cpp", "cpu_attention.cpp", "cpu_layers.cpp",
                                                      "cpu_int8.cpp", "cpu_prefill.cpp", "cpu_amx.cpp",
                                                      "cpu_gemm.cpp")]
_MODULE = "tokenmill_cpu_kernels"
_FUNCTIONS = ["paged_attention", "rms_norm", "varlen_attention", "quantize_rows_int8", "int8_epilogue",
              "quantize_rows_uint8", "int8_gemm_available", "int8_pack_weight", "int8_gemm", "write_kv",
              "argmax_rows", "rope", "silu_mul_quantize_uint8", "silu_mul", "int8g_bf16_available",
              "int8g_gemm", "amx_available", "paged_attention_amx",
              "int8g_gemm_amx", "paged_attention_tiled", "int4g_gemm_amx", "moe_experts", "logprob_rows",
              "paged_attention_windowed", "int8_gemm_amx", "amx_int8_available",
              "int8_gemm_argmax", "moe_experts_w8a8", "moe_experts_panels", "sample_rows",
              "sample_rows_filtered", "lora_rows", "moe_experts_lora", "moe_experts_panels_lora",
              "moe_experts_w8a8_lora", "int8_mm_available", "int8_mm_pack", "int8_mm",
              "panel_gemm_available", "panel_pack", "panel_gemm"]
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
           "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
log = logging.getLogger("tokenmill")


@dataclass(frozen=True)
class KernelLoad:
    """The outcome of loading the kernels in this process."""

    module: object | None  # the extension module, or None when it could not be built
    error: str | None  # why not
    build_seconds: float  # seconds spent compiling in this process (0 when loaded from the cache)
    path: Path | None  # the cached shared library


def kernel_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tokenmill" / "kernels"


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _cpu_facts() -> str:
    """This CPU's model and feature flags: the build uses -march=native, so a binary only suits the CPU kind that
    built it, and a shared cache (an NFS home, a copied image) must not hand one CPU's binary to another."""
    facts = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            facts += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    return facts


def _compiler() -> tuple[str | None, str]:
    """(the C++ compiler torch will call, its version line), or (None, why not)."""
    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return None, f"no C++ compiler ({cxx!r} is not on PATH)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C++ compiler {path} does not run: {e}"
    return path, (out.splitlines() or [""])[0]


def _base_dir(source: str) -> Path:
    import torch

    key = _digest(source, " ".join(_CFLAGS + _LDFLAGS), _cpu_facts(), torch.__version__,
                  sys.version.split()[0])
    return kernel_cache_root() / key


def _source() -> str:
    return "\n".join(p.read_text() for p in _SOURCE_FILES)


def _import(path: Path):
    import torch  # noqa: F401  (the extension links against libtorch, which importing torch loads)

    spec = importlib.util.spec_from_file_location(_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_kernels() -> KernelLoad:
    """Loads the cached build, or builds it (once per machine). Never raises: a failure is in ``error``. The sources
    are read once, so the build compiles the text its cache key names (an edit during a build cannot land in a
    directory keyed by the text before it)."""
    source = _source()
    base = _base_dir(source)
    cxx, version = _compiler()
    if cxx is None:  # no compiler now: a build made earlier by any compiler for this source and CPU still serves
        cached = sorted(base.glob(f"*/{_MODULE}.so"), key=lambda p: p.stat().st_mtime)
        if cached:
            return _load_cached(cached[-1])
        return _failed(version)
    target = base / _digest(version) / f"{_MODULE}.so"
    if target.exists():
        return _load_cached(target)
    log.info("building the C++ CPU kernels for this machine (once; about a minute; cached in %s)", target.parent)
    t0 = time.perf_counter()
    try:
        module = _build(target, source)
    except Exception as e:  # no ninja, a compile error, ...: fall back to the torch path
        return _failed(f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    seconds = time.perf_counter() - t0
    log.info("built the C++ CPU kernels in %.1f s", seconds)
    return KernelLoad(module, None, seconds, target)


def _load_cached(path: Path) -> KernelLoad:
    try:
        return KernelLoad(_import(path), None, 0.0, path)
    except Exception as e:  # a damaged cache file: say so, use the torch path
        return _failed(f"the cached build {path} does not load ({type(e).__name__}: {e}); delete it to rebuild")


def _build(target: Path, source: str):
    from torch.utils.cpp_extension import load_inline

    _put_ninja_on_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as build_dir:
        module = load_inline(name=_MODULE, cpp_sources=source, functions=_FUNCTIONS,
                             extra_cflags=_CFLAGS, extra_ldflags=_LDFLAGS, build_directory=build_dir, verbose=False)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(Path(build_dir) / f"{_MODULE}.so", tmp)
        os.replace(tmp, target)  # another process building at the same time writes the same bytes
    return module


def build_for_arch(march: str, build_dir: Path):
    """The kernels compiled for another ``-march`` (e.g. "x86-64-v3": AVX2 without AVX-512) into ``build_dir``, not
    cached: the tests run the portable code paths that this CPU's own build never takes."""
    from torch.utils.cpp_extension import load_inline

    _put_ninja_on_path()
    flags = [f"-march={march}" if f == "-march=native" else f for f in _CFLAGS]
    return load_inline(name=f"{_MODULE}_{march.replace('-', '_')}", cpp_sources=_source(),
                       functions=_FUNCTIONS, extra_cflags=flags, extra_ldflags=_LDFLAGS, build_directory=str(build_dir),
                       verbose=False)


def _failed(reason: str) -> KernelLoad:
    log.warning("warning: the C++ CPU kernels are not available (%s). Attention, RMSNorm and the int8 helpers fall "
                "back to the torch path: attention runs several times slower on CPU and jobs lose much of their "
                "throughput. Install a C++ compiler (e.g. apt-get install g++) and ninja (pip install ninja), then run "
                "`tokenmill build-kernels`.", reason)
    return KernelLoad(None, reason, 0.0, None)


def load():
    """The compiled module, or None when it cannot be built here (the reason is in ``build_error()``)."""
    return load_kernels().module


def build_error() -> str | None:
    return load_kernels().error


def build_seconds_so_far() -> float:
    """Seconds this process spent compiling the kernels (0 if it loaded them from the cache or never needed them)."""
    return load_kernels().build_seconds if load_kernels.cache_info().currsize else 0.0


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip-installed one lives in the venv's bin, which a non-activated
    interpreter does not have on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
