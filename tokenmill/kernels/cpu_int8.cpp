// tokenmill's C++ CPU kernels (w8a8's quantization, epilogue and VNNI GEMM; int8 weight-only's panel GEMMs), compiled on first use by tokenmill/kernels/cpu_kernel.py as one module with
// the other cpu_*.cpp files, in the order it lists them (later files use earlier ones): see its docstring.

// ---------------------------------------------------------------------------------------------- int8 GEMM helpers
// w8a8 (model/quant.py): activations are quantized per row before torch._int_mm, and its int32 result is scaled back
// after it. Each is one pass over the data here instead of 4-6 torch ops with as many temporaries.

// x [M, K] contiguous (float32 / bf16 / fp16) -> per row, asymmetric: lo = min(x), scale = max(max(x) - lo, 1e-12)
// / 255 (float32), codes u = round_half_even((x - lo) * (1 / scale)) in 0..255 (one reciprocal per row, then a
// multiply per value instead of a division). Bit-equal to the torch ops in model/quant.py (same subtraction,
// reciprocal, product and rounding). The value of u is lo + u * scale; with q = u - 128 (the int8 codes
// torch._int_mm takes) it is q * scale + (lo + 128 * scale), which the epilogues use. Asymmetric codes spend all 256
// levels on the row's own range, where symmetric absmax codes leave half of them unused on a one-sided row (the
// perplexity this saves: BENCHMARKS.md).
// One row: the scalar loop is the definition; with AVX-512 the same subtraction, product and round-half-even
// (cvtps2dq under the default rounding mode) run 16 lanes at a time.
// offset: store u as uint8 (the unsigned operand of VNNI's u8 x s8 products); otherwise q = u - 128 as int8 (the
// same byte with its top bit flipped).
static inline void quantize_row(const float* x, int8_t* o, float lo, float s, int64_t K, bool offset) {
  int64_t k = 0;
  const uint8_t flip = offset ? 0 : 0x80;
  const float inv = 1.f / s;
#if defined(__AVX512F__)
  const __m512 iv = _mm512_set1_ps(inv), lov = _mm512_set1_ps(lo);
  const __m128i flipv = _mm_set1_epi8(static_cast<char>(flip));
  for (; k + 16 <= K; k += 16) {
    const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + k), lov), iv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + k), _mm_xor_si128(_mm512_cvtusepi32_epi8(i), flipv));
  }
#endif
  for (; k < K; ++k) {
    const float u = std::min(std::nearbyint((x[k] - lo) * inv), 255.f);
    o[k] = static_cast<int8_t>(static_cast<uint8_t>(u) ^ flip);
  }
}

// {min, max} of x[0:K].
static inline std::pair<float, float> min_max(const float* x, int64_t K) {
  vec16 lo = vec16{} + INFINITY, hi = vec16{} - INFINITY;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const vec16 v = load16(x + k);
    lo = vmin16(v, lo);
    hi = vmax16(v, hi);
  }
  float a = INFINITY, b = -INFINITY;
  for (int i = 0; i < 16; ++i) {
    a = std::min(a, lo[i]);
    b = std::max(b, hi[i]);
  }
  for (; k < K; ++k) {
    a = std::min(a, x[k]);
    b = std::max(b, x[k]);
  }
  return {a, b};
}

// One row's scale and codes (quantize_row); returns the row's minimum.
static inline float quantize_row_minmax(const float* x, int8_t* o, float* scale, int64_t K, bool offset) {
  const auto [lo, hi] = min_max(x, K);
  const float s = std::max(hi - lo, 1e-12f) / 255.f;
  *scale = s;
  quantize_row(x, o, lo, s, K, offset);
  return lo;
}

template <typename scalar_t>
static void quantize_rows_impl(const torch::Tensor& x, torch::Tensor& q, torch::Tensor& scale, torch::Tensor& lo,
                               bool offset) {
  const int64_t K = x.size(1), M = x.size(0);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  int8_t* qp = static_cast<int8_t*>(q.data_ptr());
  float* sp = scale.data_ptr<float>();
  float* lp = lo.data_ptr<float>();
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(K);
    for (int64_t r = begin; r < end; ++r) {
      to_float(xp + r * K, xf.data(), K);
      lp[r] = quantize_row_minmax(xf.data(), qp + r * K, sp + r, K, offset);
    }
  });
}

// -> {codes [M, K], scale [M] float32, min [M] float32}.
static std::vector<torch::Tensor> quantize_rows(const torch::Tensor& x, bool offset) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, K] tensor");
  auto q = torch::empty(x.sizes(), x.options().dtype(offset ? torch::kUInt8 : torch::kInt8));
  auto scale = torch::empty({x.size(0)}, x.options().dtype(torch::kFloat32));
  auto lo = torch::empty({x.size(0)}, x.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "quantize_rows",
                                  [&] { quantize_rows_impl<scalar_t>(x, q, scale, lo, offset); });
  return {q, scale, lo};
}

// The gated MLP's activation and the down projection's input quantization in one pass, for w8a8 in bfloat16:
// gate_up [M, 2I] bfloat16 contiguous (gate first) -> {[M, I] uint8 codes, [M] float32 scales, [M] minima}, what
// quantize_rows_uint8 gives for torch's bf16(bf16(silu(gate)) * up) (the same roundings; sigmoid from
// exp(-|g|) with Cephes' expf where torch uses Sleef's, so a product may differ in its last bit).
std::vector<torch::Tensor> silu_mul_quantize_uint8(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0 &&
              gate_up.scalar_type() == torch::kBFloat16, "gate_up must be a contiguous [M, 2I] bfloat16 tensor");
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto q = torch::empty({M, I}, gate_up.options().dtype(torch::kUInt8));
  auto scale = torch::empty({M}, gate_up.options().dtype(torch::kFloat32));
  auto lo = torch::empty({M}, gate_up.options().dtype(torch::kFloat32));
  const c10::BFloat16* gp = gate_up.data_ptr<c10::BFloat16>();
  int8_t* qp = static_cast<int8_t*>(q.data_ptr());
  float* sp = scale.data_ptr<float>();
  float* lp = lo.data_ptr<float>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(I), u(I);
    for (int64_t m = begin; m < end; ++m) {
      to_float(gp + m * 2 * I, g.data(), I);
      to_float(gp + m * 2 * I + I, u.data(), I);
      for (int64_t i = 0; i < I; ++i) {
        const float x = g[i];
        const float e = exp_nonpos(-std::fabs(x));
        const float sig = (x >= 0.f ? 1.f : e) / (1.f + e);
        const float silu = static_cast<float>(from_float<c10::BFloat16>(x * sig));
        g[i] = static_cast<float>(from_float<c10::BFloat16>(silu * u[i]));
      }
      lp[m] = quantize_row_minmax(g.data(), qp + m * I, sp + m, I, true);
    }
  });
  return {q, scale, lo};
}

std::vector<torch::Tensor> quantize_rows_int8(torch::Tensor x) { return quantize_rows(x, false); }

// The same codes as uint8 (u, not u - 128): the activations' operand of int8_gemm.
std::vector<torch::Tensor> quantize_rows_uint8(torch::Tensor x) { return quantize_rows(x, true); }

// The optional epilogue operands of an [M, N] output: bias [N] and residual [M, N], contiguous, of out's dtype.
static void check_bias_residual(const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                                const torch::Tensor& out) {
  TORCH_CHECK(!bias || (bias->is_contiguous() && bias->numel() == out.size(1) &&
                        bias->scalar_type() == out.scalar_type()), "bias must be [N] of out's dtype");
  TORCH_CHECK(!residual || (residual->is_contiguous() && residual->sizes() == out.sizes() &&
                            residual->scalar_type() == out.scalar_type()), "residual must be [M, N] of out's dtype");
}

// out[m, n] = float(acc[m, n]) * x_scale[m] * w_scale[n] (+ bias[n]) (+ residual[m, n]), rounded once to out's dtype.
template <typename scalar_t>
static void int8_epilogue_impl(const torch::Tensor& acc, const torch::Tensor& xs, const torch::Tensor& xlo,
                               const torch::Tensor& ws, const torch::Tensor& wsum,
                               const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                               torch::Tensor& out) {
  const int64_t M = acc.size(0), N = acc.size(1);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* xsp = xs.data_ptr<float>();
  const float* xlp = xlo.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const float* wup = wsum.data_ptr<float>();
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> bf(N, 0.f), rf(N);
    if (bp) to_float(bp, bf.data(), N);
    for (int64_t m = begin; m < end; ++m) {
      const int32_t* a = ap + m * N;
      const float s = xsp[m], z = xlp[m] + 128.f * s;  // z: the value of code q = 0
      scalar_t* o = op + m * N;
      if (rp) {
        to_float(rp + m * N, rf.data(), N);
        for (int64_t n = 0; n < N; ++n)
          o[n] = from_float<scalar_t>((static_cast<float>(a[n]) * s + z * wup[n]) * wsp[n] + bf[n] + rf[n]);
      } else {
        for (int64_t n = 0; n < N; ++n)
          o[n] = from_float<scalar_t>((static_cast<float>(a[n]) * s + z * wup[n]) * wsp[n] + bf[n]);
      }
    }
  });
}

// out = (acc * x_scale + (x_min + 128 x_scale) * w_sum) * w_scale (+ bias) (+ residual), rounded once: the layer's
// output from torch._int_mm's int32 sums of quantize_rows_int8's codes (u - 128) against the int8 weight.
// acc [M, N] int32, x_scale / x_min [M] and w_scale / w_sum [N] (each channel's sum of codes) float32, bias [N] and
// residual [M, N] (optional) of out's dtype; out [M, N] contiguous, written in place.
void int8_epilogue(torch::Tensor acc, torch::Tensor x_scale, torch::Tensor x_min, torch::Tensor w_scale,
                   torch::Tensor w_sum, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> residual,
                   torch::Tensor out) {
  TORCH_CHECK(acc.is_contiguous() && out.is_contiguous() && acc.sizes() == out.sizes(), "acc and out: same [M, N]");
  TORCH_CHECK(acc.scalar_type() == torch::kInt32 && x_scale.scalar_type() == torch::kFloat32 &&
              w_scale.scalar_type() == torch::kFloat32, "acc int32, scales float32");
  TORCH_CHECK(x_scale.numel() == acc.size(0) && w_scale.numel() == acc.size(1), "scales must be [M] and [N]");
  TORCH_CHECK(x_min.scalar_type() == torch::kFloat32 && x_min.numel() == acc.size(0) &&
              w_sum.scalar_type() == torch::kFloat32 && w_sum.numel() == acc.size(1), "x_min [M], w_sum [N] float32");
  check_bias_residual(bias, residual, out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, out.scalar_type(), "int8_epilogue",
                                  [&] {
    int8_epilogue_impl<scalar_t>(acc, x_scale, x_min, w_scale, w_sum, bias, residual, out);
  });
}

// Calls tile(std::integral_constant<int, R>{}) with R = min(MAX, rows): the GEMMs' register tiles of up to MAX rows
// (6 unless given), the row count a compile-time constant so each tile's accumulators stay in registers.
template <int MAX = 6, typename F>
static inline void with_tile_rows(int64_t rows, F&& tile) {
  if constexpr (MAX > 1) {
    if (rows < MAX) return with_tile_rows<MAX - 1>(rows, tile);
  }
  tile(std::integral_constant<int, MAX>{});
}

// ---------------------------------------------------------------------------------------------- int8 GEMM (VNNI)
// w8a8's GEMM with its epilogue fused: out[m, n] = (float(sum_k q_x[m, k] q_w[n, k]) * x_scale[m] + z[m] *
// sum_k q_w[n, k]) * w_scale[n] (+ bias[n]) (+ residual[m, n]) with q_x = u - 128 and z = x_min + 128 x_scale,
// rounded once to out's dtype (the same expression, in the same order, as int8_epilogue after torch._int_mm).
// AVX512-VNNI's vpdpbusd multiplies unsigned by signed bytes: the activations come as their codes u
// (quantize_rows_uint8) and 128 * sum_k q_w[n, k] (``comp``, computed when packing) is taken off the int32 sums.
// The weight is packed once into panels of 64 output channels, [N/64][K/4][64][4]: one k-step of 4 bytes for 64
// channels is four 64-byte loads. A register tile of MR rows x 64 channels (24 accumulators at MR = 6) walks
// K; threads take (panel, row block) tasks, panel-major so a thread's next task reuses the panel from cache.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static constexpr bool int8_gemm_ok = true;
constexpr int64_t GEMM_NR = 64;  // output channels per panel (4 x 16 int32 lanes)
constexpr int64_t GEMM_MB = 48;  // rows per task (8 register tiles of 6)

// float -> bfloat16, round to nearest even (NaN stays NaN): from_float<BFloat16>, 16 lanes at a time.
static inline __m256i bf16_round(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <typename scalar_t>
static inline __m512 load16_as_float(const scalar_t* p, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_maskz_loadu_ps(m, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename scalar_t>
static inline void store16_masked(scalar_t* p, __m512 f, __mmask16 m) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_mask_storeu_ps(p, m, f);
  } else {
    _mm256_mask_storeu_epi16(p, m, bf16_round(f));
  }
}

// int8_gemm's epilogue value for one row's 16 channels: acc = sum_k u[k] q_w[n, k] (int32), cj = 128 * sum_k q_w[n, k],
// sumj = sum_k q_w[n, k], wj = w_scale, bj = bias (or 0) -> float32, before the residual and the store
// (int8_gemm_argmax compares these values: the logits an unfused float32 head stores).
static inline __m512 int8_value16(__m512i acc, __m512i cj, __m512 sumj, __m512 wj, __m512 bj, float xs, float xlo) {
  const float z = xlo + 128.f * xs;
  __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, cj));
  f = _mm512_add_ps(_mm512_mul_ps(f, _mm512_set1_ps(xs)), _mm512_mul_ps(_mm512_set1_ps(z), sumj));
  return _mm512_add_ps(_mm512_mul_ps(f, wj), bj);
}

// The epilogue's store (lanes m), the residual added first, rounded once to out's dtype: the one body that int8_gemm
// (VNNI) and int8_gemm_amx (AMX tiles) share, so their results are equal bit for bit.
template <typename scalar_t>
static inline void int8_store16(__m512i acc, __m512i cj, __m512 sumj, __m512 wj, __m512 bj, float xs, float xlo,
                                const scalar_t* res, scalar_t* out, __mmask16 m) {
  __m512 f = int8_value16(acc, cj, sumj, wj, bj, xs, xlo);
  if (res) f = _mm512_add_ps(f, load16_as_float(res, m));
  store16_masked(out, f, m);
}

// rows m0 .. m0 + MR - 1 of the output's columns n0 .. n0 + ncols - 1 (ncols <= 64; the panel is zero-padded).
template <typename scalar_t, int MR>
static inline void int8_tile(const uint8_t* a, int64_t K, const int8_t* panel, const int32_t* comp, const float* xs,
                             const float* xlo, const float* ws, const scalar_t* bias, const scalar_t* res,
                             scalar_t* out, int64_t N, int64_t ncols) {
  __m512i acc[MR][4];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  const int64_t K4 = K / 4;
  for (int64_t k = 0; k < K4; ++k) {
    const int8_t* b = panel + k * 4 * GEMM_NR;
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);
    const __m512i b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      int32_t a4;
      std::memcpy(&a4, a + i * K + 4 * k, sizeof(a4));
      const __m512i va = _mm512_set1_epi32(a4);
      acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], va, b0);
      acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], va, b1);
      acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], va, b2);
      acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], va, b3);
    }
  }
  _Pragma("GCC unroll 4") for (int j = 0; j < 4; ++j) {
    const int64_t left = ncols - 16 * j;
    if (left <= 0) break;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512i cj = _mm512_loadu_si512(comp + 16 * j);
    const __m512 sumj = _mm512_cvtepi32_ps(_mm512_srai_epi32(cj, 7));  // sum_k q_w[n, k], exact
    const __m512 wj = _mm512_maskz_loadu_ps(m, ws + 16 * j);
    const __m512 bj = bias ? load16_as_float(bias + 16 * j, m) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i)
      int8_store16(acc[i][j], cj, sumj, wj, bj, xs[i], xlo[i], res ? res + i * N + 16 * j : nullptr,
                   out + i * N + 16 * j, m);
  }
}

// int8_gemm's operands as pointers (int8_gemm_amx's too); out may be undefined (int8_gemm_argmax writes none).
template <typename scalar_t>
struct Int8GemmPtrs {
  const uint8_t* ap;
  const int8_t* pp;
  const int32_t* cp;
  const float *xsp, *xlp, *wsp;
  const scalar_t *bp, *rp;
  scalar_t* op;
  Int8GemmPtrs(const torch::Tensor& a, const torch::Tensor& packed, const torch::Tensor& comp, const torch::Tensor& xs,
               const torch::Tensor& xlo, const torch::Tensor& ws, const std::optional<torch::Tensor>& bias,
               const std::optional<torch::Tensor>& residual, const torch::Tensor& out)
      : ap(a.data_ptr<uint8_t>()), pp(packed.data_ptr<int8_t>()), cp(comp.data_ptr<int32_t>()),
        xsp(xs.data_ptr<float>()), xlp(xlo.data_ptr<float>()), wsp(ws.data_ptr<float>()),
        bp(bias ? bias->data_ptr<scalar_t>() : nullptr), rp(residual ? residual->data_ptr<scalar_t>() : nullptr),
        op(out.defined() ? out.data_ptr<scalar_t>() : nullptr) {}
};

template <typename scalar_t>
static void int8_gemm_impl(const torch::Tensor& a, const torch::Tensor& packed, const torch::Tensor& comp,
                           const torch::Tensor& xs, const torch::Tensor& xlo, const torch::Tensor& ws,
                           const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                           torch::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1), panels = packed.size(0);
  const Int8GemmPtrs<scalar_t> P(a, packed, comp, xs, xlo, ws, bias, residual, out);
  const int64_t blocks = (M + GEMM_MB - 1) / GEMM_MB;
  at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / blocks, mb = t % blocks, n0 = p * GEMM_NR;
      const int64_t ncols = std::min(GEMM_NR, N - n0);
      const int8_t* panel = P.pp + p * K * GEMM_NR;
      for (int64_t m = mb * GEMM_MB; m < std::min(M, (mb + 1) * GEMM_MB); m += 6) {
        with_tile_rows(M - m, [&](auto mr) {
          int8_tile<scalar_t, decltype(mr)::value>(P.ap + m * K, K, panel, P.cp + n0, P.xsp + m, P.xlp + m, P.wsp + n0,
                                                    P.bp ? P.bp + n0 : nullptr, P.rp ? P.rp + m * N + n0 : nullptr,
                                                    P.op + m * N + n0, N, ncols);
        });
      }
    }
  });
}
#else
static constexpr bool int8_gemm_ok = false;
constexpr int64_t GEMM_NR = 64;
#endif

bool int8_gemm_available() { return int8_gemm_ok; }

// w [N, K] int8 contiguous, K % 4 == 0 -> [ceil(N / NR), K / 4, NR, 4] int8: panels of NR channels, each k-step's 4
// bytes per channel together (channels past N are zero); and, where comp is given, comp[n] = 128 * sum_k w[n, k]
// (comp holds ceil(N / NR) * NR zeroed int32). int8_gemm's packing (NR = 64) and int8_mm's (NR = 16).
static torch::Tensor pack_k4_panels(const torch::Tensor& w, int64_t nr, int32_t* comp) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kInt8, "w must be a contiguous [N, K] "
              "int8 tensor");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 4 == 0, "K must be a multiple of 4");
  auto packed = torch::zeros({(N + nr - 1) / nr, K / 4, nr, 4}, w.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int8_t* dst = pp + (n / nr) * K * nr + (n % nr) * 4;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        dst[(k / 4) * 4 * nr + k % 4] = wp[n * K + k];
        sum += wp[n * K + k];
      }
      if (comp) comp[n] = 128 * sum;
    }
  });
  return packed;
}

// w [N, K] int8 contiguous, K % 4 == 0 -> {packed [ceil(N / 64), K / 4, 64, 4] int8 (channels past N are zero),
// comp [ceil(N / 64) * 64] int32 = 128 * sum_k w[n, k]}.
std::vector<torch::Tensor> int8_pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "w must be a contiguous [N, K] int8 tensor");
  auto comp = torch::zeros({(w.size(0) + GEMM_NR - 1) / GEMM_NR * GEMM_NR}, w.options().dtype(torch::kInt32));
  auto packed = pack_k4_panels(w, GEMM_NR, comp.data_ptr<int32_t>());
  return {packed, comp};
}

// int8_gemm's operands (int8_gemm_amx's too): a [M, K] uint8 with x_scale / x_min [M] float32 (quantize_rows_uint8),
// packed / comp from int8_pack_weight, w_scale [N] float32, bias [N] and residual [M, N] (optional) of out's dtype,
// out [M, N] float32 or bfloat16 contiguous, written in place.
static void check_int8_gemm_args(const torch::Tensor& a, const torch::Tensor& packed, const torch::Tensor& x_scale,
                                 const torch::Tensor& x_min, const torch::Tensor& w_scale,
                                 const std::optional<torch::Tensor>& bias,
                                 const std::optional<torch::Tensor>& residual, const torch::Tensor& out) {
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.scalar_type() == torch::kUInt8, "a must be [M, K] uint8");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 4 == a.size(1) && packed.size(2) == GEMM_NR,
              "packed does not match a's K (int8_pack_weight)");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == a.size(0) &&
              (out.size(1) + GEMM_NR - 1) / GEMM_NR == packed.size(0), "out must be [M, N] for this packed weight");
  TORCH_CHECK(x_scale.scalar_type() == torch::kFloat32 && w_scale.scalar_type() == torch::kFloat32 &&
              x_scale.numel() == a.size(0) && w_scale.numel() == out.size(1), "scales: float32 [M] and [N]");
  TORCH_CHECK(x_min.scalar_type() == torch::kFloat32 && x_min.numel() == a.size(0), "x_min: float32 [M]");
  check_bias_residual(bias, residual, out);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16,
              "out must be float32 or bfloat16");
}

void int8_gemm(torch::Tensor a, torch::Tensor packed, torch::Tensor comp, torch::Tensor x_scale, torch::Tensor x_min,
               torch::Tensor w_scale, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> residual,
               torch::Tensor out) {
  TORCH_CHECK(int8_gemm_ok, "int8_gemm needs AVX512-VNNI (check int8_gemm_available())");
  check_int8_gemm_args(a, packed, x_scale, x_min, w_scale, bias, residual, out);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (out.scalar_type() == torch::kFloat32)
    int8_gemm_impl<float>(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
  else
    int8_gemm_impl<c10::BFloat16>(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
#endif
}

// ------------------------------------------------------------ int8 x int8 -> int32 GEMM on AVX2 (no AVX512-VNNI)
// acc[m, n] = sum_k q_x[m, k] q_w[n, k]: torch._int_mm's int32 sums exactly, for w8a8 where int8_gemm (VNNI) is not
// built (torch's own _int_mm runs at ~2 GOPS on an AVX2-only CPU such as AMD Zen 3: w8a8 ran 25x slower than
// float32 there). AVX2 has no signed x signed byte product: vpmaddubsw multiplies unsigned by signed bytes and adds
// adjacent pairs into saturating int16. So each product is taken as |q_x| * (sign(q_x) q_w) (vpabsb, vpsignb):
// |q_x| <= 128 and |q_w| <= 127 bound a pair's sum by 32,512, never saturating (the weight's codes must lie in
// -127..127, quantize_int8_rows' symmetric ones: int8_mm_pack checks), and vpmaddwd against ones widens pairs of pairs
// into int32 lanes. The weight is packed once into panels of 16 channels, [N/16][K/4][16][4]: one k-step of 4 bytes
// for 16 channels is two 32-byte loads; a register tile of MR rows x 16 channels (8 accumulators at MR = 4) walks K.
constexpr int64_t MM_NR = 16;  // output channels per panel (2 x 8 int32 lanes)
constexpr int64_t MM_MB = 32;  // rows per task
#if defined(__AVX2__)
static constexpr bool int8_mm_ok = true;

template <int MR>
static inline void int8_mm_tile(const int8_t* q, const uint8_t* qa, int64_t K, const int8_t* panel, int32_t* out,
                                int64_t N, int64_t ncols) {
  __m256i acc[MR][2];
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t K4 = K / 4;
  for (int64_t k = 0; k < K4; ++k) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * 4 * MM_NR));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + k * 4 * MM_NR + 32));
    _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
      int32_t s4, a4;
      std::memcpy(&s4, q + i * K + 4 * k, sizeof(s4));
      std::memcpy(&a4, qa + i * K + 4 * k, sizeof(a4));
      const __m256i vs = _mm256_set1_epi32(s4), va = _mm256_set1_epi32(a4);
      acc[i][0] = _mm256_add_epi32(acc[i][0],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(va, _mm256_sign_epi8(b0, vs)), ones));
      acc[i][1] = _mm256_add_epi32(acc[i][1],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(va, _mm256_sign_epi8(b1, vs)), ones));
    }
  }
  _Pragma("GCC unroll 4") for (int i = 0; i < MR; ++i) {
    int32_t* o = out + i * N;
    if (ncols == MM_NR) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), acc[i][0]);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 8), acc[i][1]);
    } else {
      alignas(32) int32_t tmp[MM_NR];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), acc[i][0]);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp + 8), acc[i][1]);
      std::memcpy(o, tmp, ncols * sizeof(int32_t));
    }
  }
}
#else
static constexpr bool int8_mm_ok = false;
#endif

bool int8_mm_available() { return int8_mm_ok; }

// w [N, K] int8 contiguous, codes in -127..127, K % 4 == 0 -> packed [ceil(N / 16), K / 4, 16, 4] int8 (channels
// past N are zero).
torch::Tensor int8_mm_pack(torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() != torch::kInt8 || w.numel() == 0 || w.min().item<int>() >= -127,
              "int8_mm needs weight codes in -127..127");
  return pack_k4_panels(w, MM_NR, nullptr);
}

// q [M, K] int8 contiguous (quantize_rows_int8's codes), packed from int8_mm_pack, N its channels -> [M, N] int32,
// equal to torch._int_mm(q, w.t()).
torch::Tensor int8_mm(torch::Tensor q, torch::Tensor packed, int64_t N) {
  TORCH_CHECK(int8_mm_ok, "int8_mm needs AVX2 (check int8_mm_available())");
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "q must be [M, K] int8");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 4 == q.size(1) && packed.size(2) == MM_NR &&
              (N + MM_NR - 1) / MM_NR == packed.size(0), "packed does not match q's K and N (int8_mm_pack)");
  const int64_t M = q.size(0), K = q.size(1), panels = packed.size(0);
  auto out = torch::empty({M, N}, q.options().dtype(torch::kInt32));
#if defined(__AVX2__)
  auto absq = torch::empty({M, K}, q.options().dtype(torch::kUInt8));  // |q| (128 for -128: vpabsb's byte)
  const int8_t* qp = q.data_ptr<int8_t>();
  uint8_t* ap = absq.data_ptr<uint8_t>();
  at::parallel_for(0, M * K, 4096, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 32 <= end; i += 32)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(ap + i),
                          _mm256_abs_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qp + i))));
    for (; i < end; ++i) ap[i] = static_cast<uint8_t>(qp[i] < 0 ? -int(qp[i]) : int(qp[i]));
  });
  const int8_t* pp = packed.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  const int64_t blocks = (M + MM_MB - 1) / MM_MB;
  at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / blocks, mb = t % blocks, n0 = p * MM_NR, ncols = std::min(MM_NR, N - n0);
      const int8_t* panel = pp + p * K * MM_NR;
      for (int64_t m = mb * MM_MB; m < std::min(M, (mb + 1) * MM_MB); m += 4) {
        with_tile_rows<4>(M - m, [&](auto mr) {
          int8_mm_tile<decltype(mr)::value>(qp + m * K, ap + m * K, K, panel, op + m * N + n0, N, ncols);
        });
      }
    }
  });
#endif
  return out;
}

// ------------------------------------------------------- int8 weights in groups of 32, bf16 or float32 activations
// The int8 weight-only GEMM: y[m, n] = sum_g (s[n, g] * sum_{k in g} x[m, k] * q[n, k] + o[n, g] * X[m, g])
// (+ bias) (+ residual), with int8 codes q, a float16 scale s and offset o per 32 weights along K (w = q * s + o:
// asymmetric groups; GGUF's Q8_0 blocks are the case o = 0) and X[m, g] the sum of x[m, k] over group g. The weight
// is packed once into panels of 32 channels, [N/32][K/2][32][2] int8, the scales and offsets into [N/32][K/32][2][32].
// Two paths share that packing: bfloat16 x with AVX512-BF16 (the fast one), float32 x on any CPU.
constexpr int64_t G8_NR = 32;     // output channels per panel (2 x 16 float lanes)
constexpr int64_t G8_GROUP = 32;  // weights per scale along K
constexpr int64_t G8_MB = 48;     // rows per task (8 register tiles of 6)

// Runs task(panel, first row, last row) for every (panel of 32 channels, block of G8_MB rows) of an int8g GEMM, in
// parallel, panel-major so that a thread's consecutive tasks share a panel; a thread's buffer holds the panel it last
// prepared (prepare(panel, buffer)), so the next task on that panel skips preparing it.
template <typename buf_t, typename Prepare, typename Task>
static void int8g_for_tasks(int64_t M, int64_t panels, int64_t panel_size, Prepare&& prepare, Task&& task) {
  const int64_t blocks = (M + G8_MB - 1) / G8_MB;
  at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<buf_t> buffer;
    int64_t prepared = -1;  // the panel in `buffer` during this call
    buffer.resize(panel_size);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / blocks, mb = t % blocks;
      if (p != prepared) {
        prepare(p, buffer.data());
        prepared = p;
      }
      task(p, buffer.data(), mb * G8_MB, std::min(M, (mb + 1) * G8_MB));
    }
  });
}

// ------------------------------------------- the portable path: float32 activations, any CPU (vector extensions)
// Each task dequantizes its panel to float, [K][32] (w = q * s + o, one rounding), then register tiles of rows x 32
// channels run a float GEMM over K. Slower than the bfloat16 path below, but the same asymmetric groups (so the same
// quality) on a CPU without AVX512-BF16, and the input is not rounded.
#ifdef __AVX512F__
constexpr int G8F_MR = 6;  // 12 accumulators of 16 lanes
#else
constexpr int G8F_MR = 3;  // AVX2: a vec16 is two registers
#endif

static void int8g_dequantize_panel(const int8_t* codes, const c10::Half* so, float* dst, int64_t K) {
  for (int64_t g = 0; g < K / G8_GROUP; ++g) {
    float s[G8_NR], o[G8_NR];
    for (int64_t c = 0; c < G8_NR; ++c) {
      s[c] = static_cast<float>(so[g * 2 * G8_NR + c]);
      o[c] = static_cast<float>(so[g * 2 * G8_NR + G8_NR + c]);
    }
    for (int64_t k = g * G8_GROUP; k < (g + 1) * G8_GROUP; k += 2) {
      const int8_t* pair = codes + k * G8_NR;  // [32][2]: codes k and k + 1 adjacent per channel
      float f[2 * G8_NR];
      for (int64_t i = 0; i < 2 * G8_NR; ++i) f[i] = static_cast<float>(pair[i]);
      for (int64_t c = 0; c < G8_NR; ++c) {
        dst[k * G8_NR + c] = f[2 * c] * s[c] + o[c];
        dst[(k + 1) * G8_NR + c] = f[2 * c + 1] * s[c] + o[c];
      }
    }
  }
}

template <typename scalar_t, int MR>
static inline void int8f_tile(const float* x, int64_t K, const float* w, const scalar_t* bias, const scalar_t* res,
                              scalar_t* out, int64_t N, int64_t ncols) {
  vec16 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = vec16{};
  for (int64_t k = 0; k < K; ++k) {
    const vec16 w0 = load16(w + k * G8_NR), w1 = load16(w + k * G8_NR + 16);
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const float xv = x[i * K + k];
      acc[i][0] += xv * w0;
      acc[i][1] += xv * w1;
    }
  }
  for (int i = 0; i < MR; ++i) {
    float f[G8_NR];
    store16(f, acc[i][0]);
    store16(f + 16, acc[i][1]);
    for (int64_t c = 0; c < ncols; ++c) {
      float v = f[c];
      if (bias) v += static_cast<float>(bias[c]);
      if (res) v += static_cast<float>(res[i * N + c]);
      out[i * N + c] = from_float<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
static void int8f_gemm_impl(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                            const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                            torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1);
  const float* xp = x.data_ptr<float>();
  const int8_t* pp = packed.data_ptr<int8_t>();
  const c10::Half* sp = scales.data_ptr<at::Half>();
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  int8g_for_tasks<float>(M, packed.size(0), K * G8_NR,
    [&](int64_t p, float* buf) { int8g_dequantize_panel(pp + p * K * G8_NR, sp + p * (K / G8_GROUP) * 2 * G8_NR,
                                                        buf, K); },
    [&](int64_t p, const float* buf, int64_t m0, int64_t m1) {
      const int64_t n0 = p * G8_NR, ncols = std::min(G8_NR, N - n0);
      for (int64_t m = m0; m < m1; m += G8F_MR)
        with_tile_rows<G8F_MR>(m1 - m, [&](auto mr) {
          int8f_tile<scalar_t, decltype(mr)::value>(xp + m * K, K, buf, bp ? bp + n0 : nullptr,
                                                     rp ? rp + m * N + n0 : nullptr, op + m * N + n0, N, ncols);
        });
    });
}

// ----------------------------------------------------------- the bfloat16 path: AVX512-BF16 (vdpbf16ps)
// A task widens its panel's codes to bfloat16 (exact: -128..127 needs 8 bits). Register tiles of MR rows x 32
// channels then walk the groups: vdpbf16ps sums a group's products in float32 (products of bfloat16 values are
// exact), and two fmas per group and 16 channels apply the group's scale and offset.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
static constexpr bool int8g_bf16_ok = true;

// panel codes [K/2][32][2] int8 -> the same layout in bfloat16 (32 values per 64-byte vector).
static void int8g_widen(const int8_t* src, uint16_t* dst, int64_t K) {
  for (int64_t i = 0; i < K * G8_NR; i += 32) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + i))));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(src + i + 16))));
    _mm512_storeu_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// [M, K / 32]: each bfloat16 row's sum over each group of 32 (the offsets' operand).
static std::vector<float> int8g_group_sums(const uint16_t* xp, int64_t M, int64_t K) {
  const int64_t G = K / G8_GROUP;
  std::vector<float> xsum(M * G);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* xg = xp + m * K + g * G8_GROUP;
        const __m512 a = _mm512_add_ps(load_f32x16(reinterpret_cast<const c10::BFloat16*>(xg)),
                                       load_f32x16(reinterpret_cast<const c10::BFloat16*>(xg + 16)));
        xsum[m * G + g] = _mm512_reduce_add_ps(a);
      }
  });
  return xsum;
}

// rows m0 .. m0 + MR - 1 of the output's columns n0 .. n0 + ncols - 1 (ncols <= 32; the panel is zero-padded).
template <typename scalar_t, int MR>
static inline void int8g_tile(const uint16_t* x, const float* xs, int64_t K, const uint16_t* wb, const uint16_t* sc,
                              const scalar_t* bias, const scalar_t* res, scalar_t* out, int64_t N, int64_t ncols) {
  __m512 acc[MR][2];
  _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / G8_GROUP; ++g) {
    __m512 part[MR][2];
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) part[i][0] = part[i][1] = _mm512_setzero_ps();
    const uint16_t* w = wb + g * G8_GROUP * G8_NR;
    const uint16_t* xg = x + g * G8_GROUP;
    _Pragma("GCC unroll 4") for (int p = 0; p < G8_GROUP / 2; ++p) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * 2 * G8_NR);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + p * 2 * G8_NR + 32);
      _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
        int32_t x2;
        std::memcpy(&x2, xg + i * K + 2 * p, sizeof(x2));
        const __m512bh va = (__m512bh)_mm512_set1_epi32(x2);
        part[i][0] = _mm512_dpbf16_ps(part[i][0], va, w0);
        part[i][1] = _mm512_dpbf16_ps(part[i][1], va, w1);
      }
    }
    const uint16_t* so = sc + g * 2 * G8_NR;  // 32 scales, then 32 offsets
    const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)so));
    const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(so + 16)));
    const __m512 o0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(so + G8_NR)));
    const __m512 o1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(so + G8_NR + 16)));
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const __m512 xg_sum = _mm512_set1_ps(xs[i * (K / G8_GROUP) + g]);
      acc[i][0] = _mm512_fmadd_ps(xg_sum, o0, _mm512_fmadd_ps(part[i][0], s0, acc[i][0]));
      acc[i][1] = _mm512_fmadd_ps(xg_sum, o1, _mm512_fmadd_ps(part[i][1], s1, acc[i][1]));
    }
  }
  _Pragma("GCC unroll 2") for (int j = 0; j < 2; ++j) {
    const int64_t left = ncols - 16 * j;
    if (left <= 0) break;
    const __mmask16 m = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 bj = bias ? load16_as_float(bias + 16 * j, m) : _mm512_setzero_ps();
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      __m512 f = _mm512_add_ps(acc[i][j], bj);
      if (res) f = _mm512_add_ps(f, load16_as_float(res + i * N + 16 * j, m));
      store16_masked(out + i * N + 16 * j, f, m);
    }
  }
}

template <typename scalar_t>
static void int8g_gemm_impl(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                            const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                            torch::Tensor& out) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), panels = packed.size(0);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int8_t* pp = packed.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t G = K / G8_GROUP;
  const std::vector<float> xsum = int8g_group_sums(xp, M, K);
  int8g_for_tasks<uint16_t>(M, panels, K * G8_NR,
    [&](int64_t p, uint16_t* buf) { int8g_widen(pp + p * K * G8_NR, buf, K); },
    [&](int64_t p, const uint16_t* buf, int64_t m0, int64_t m1) {
      const int64_t n0 = p * G8_NR, ncols = std::min(G8_NR, N - n0);
      const uint16_t* sc = sp + p * G * 2 * G8_NR;
      for (int64_t m = m0; m < m1; m += 6) {
        with_tile_rows(m1 - m, [&](auto mr) {
          int8g_tile<scalar_t, decltype(mr)::value>(xp + m * K, xsum.data() + m * G, K, buf, sc,
                                                     bp ? bp + n0 : nullptr, rp ? rp + m * N + n0 : nullptr,
                                                     op + m * N + n0, N, ncols);
        });
      }
    });
}
#else
static constexpr bool int8g_bf16_ok = false;
#endif

bool int8g_bf16_available() { return int8g_bf16_ok; }

// x [M, K] contiguous, bfloat16 (needs AVX512-BF16: int8g_bf16_available()) or float32 (any CPU), packed
// [ceil(N / 32), K / 2, 32, 2] int8 and scales [ceil(N / 32), K / 32, 2, 32] float16 (the scales, then the offsets;
// model/quant.py's pack_int8_groups; channels past N zero), bias [N] and residual [M, N] (optional) of out's dtype,
// out [M, N] float32 or bfloat16 contiguous, written in place.
static void check_int8g_args(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                             const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                             const torch::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() &&
              (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be [M, K] float32 or bfloat16");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || int8g_bf16_ok,
              "int8g_gemm with bfloat16 x needs AVX512-BF16 (check int8g_bf16_available()); pass float32 x");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.size(1) * 2 == x.size(1) &&
              packed.size(2) == G8_NR, "packed does not match x's K (pack_int8_groups)");
  TORCH_CHECK(scales.dim() == 4 && scales.size(0) == packed.size(0) && scales.size(1) * G8_GROUP == x.size(1) &&
              scales.size(2) == 2 && scales.size(3) == G8_NR && scales.is_contiguous() &&
              scales.scalar_type() == torch::kFloat16, "scales do not match packed (pack_int8_groups)");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == x.size(0) &&
              (out.size(1) + G8_NR - 1) / G8_NR == packed.size(0), "out must be [M, N] for this packed weight");
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16,
              "out must be float32 or bfloat16");
  check_bias_residual(bias, residual, out);
}

void int8g_gemm(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, std::optional<torch::Tensor> bias,
                std::optional<torch::Tensor> residual, torch::Tensor out) {
  check_int8g_args(x, packed, scales, bias, residual, out);
  const bool f32_out = out.scalar_type() == torch::kFloat32;
  if (x.scalar_type() == torch::kFloat32) {
    if (f32_out) int8f_gemm_impl<float>(x, packed, scales, bias, residual, out);
    else int8f_gemm_impl<c10::BFloat16>(x, packed, scales, bias, residual, out);
    return;
  }
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (f32_out) int8g_gemm_impl<float>(x, packed, scales, bias, residual, out);
  else int8g_gemm_impl<c10::BFloat16>(x, packed, scales, bias, residual, out);
#endif
}
