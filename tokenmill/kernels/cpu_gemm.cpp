// Dense float GEMMs for AVX2 + FMA CPUs without AVX-512 (e.g. AMD Zen 3), where oneDNN's float32 kernels reach
// 45-70% of the FMA peak on a model's shapes: y[M, N] = x[M, K] W[N, K]^T (+ bias) (+ residual), the weight in
// panels of 16 output channels ([N / 16, K, 16], packed once), float32 or bfloat16 (widened in the register: a
// shift). A 6 x 16 register tile (12 accumulators, 2 weight loads and 6 broadcasts per 12 FMAs) runs over equal K
// blocks of at most PANEL_KC (a panel's block, 18 KB in float32, stays in L1 for all the row tiles of a row block:
// with K blocks of 576 it did not, and 2 threads ran at 63% of the FMA peak instead of 93%), row blocks of PANEL_MC
// rows (their K block in L2), the panels split between threads. An output element is the sum of its K blocks' partial
// sums, each summed in K order: results depend on K only, not on M, the row's place in the batch or the thread count.
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
constexpr bool panel_gemm_ok = true;
#else
constexpr bool panel_gemm_ok = false;
#endif
constexpr int64_t PANEL_NR = 16;   // output channels a panel
constexpr int64_t PANEL_MR = 6;    // rows a register tile
constexpr int64_t PANEL_KC = 288;  // K block, at most
constexpr int64_t PANEL_MC = 144;  // rows a block (24 register tiles), at most
constexpr int64_t PANEL_A_BYTES = 160 * 1024;  // a row block's x, past PANEL_MC rows: well inside a 512 KB L2

bool panel_gemm_available() { return panel_gemm_ok; }

// [N, K] float32 or bfloat16 -> [N / 16, K, 16] of the same dtype (N a multiple of 16)
torch::Tensor panel_pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.size(0) % PANEL_NR == 0, "panel_pack: weight must be [N, K] with N % 16 == 0");
  TORCH_CHECK(w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kBFloat16,
              "panel_pack: float32 or bfloat16 weights");
  return w.contiguous().view({w.size(0) / PANEL_NR, PANEL_NR, w.size(1)}).transpose(1, 2).contiguous();
}

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
static inline __m256 panel_load(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 panel_load(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// c[r][0:16] (+)= sum_k a[r * lda + k] * b[k * 16 + 0:16] for r < MR; first: c is written, not added to
template <int MR, typename W>
static inline void panel_tile(const float* a, int64_t lda, const W* b, int64_t kc, float* c, int64_t ldc, bool first) {
  // (the unroll pragmas let GCC keep the arrays in registers: unrolled late, it spilled them every iteration)
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = panel_load(b + k * PANEL_NR), b1 = panel_load(b + k * PANEL_NR + 8);
#pragma GCC unroll 6
    for (int r = 0; r < MR; ++r) {
      const __m256 x = _mm256_broadcast_ss(a + r * lda + k);
      c0[r] = _mm256_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (!first) {
      c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(cr));
      c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(cr + 8));
    }
    _mm256_storeu_ps(cr, c0[r]);
    _mm256_storeu_ps(cr + 8, c1[r]);
  }
}

template <typename W>
static void panel_rows(const float* a, int64_t lda, const W* b, int64_t kc, float* c, int64_t ldc, int64_t m,
                       bool first) {
  int64_t r = 0;
  for (; r + PANEL_MR <= m; r += PANEL_MR) panel_tile<PANEL_MR>(a + r * lda, lda, b, kc, c + r * ldc, ldc, first);
  switch (m - r) {
    case 5: panel_tile<5>(a + r * lda, lda, b, kc, c + r * ldc, ldc, first); break;
    case 4: panel_tile<4>(a + r * lda, lda, b, kc, c + r * ldc, ldc, first); break;
    case 3: panel_tile<3>(a + r * lda, lda, b, kc, c + r * ldc, ldc, first); break;
    case 2: panel_tile<2>(a + r * lda, lda, b, kc, c + r * ldc, ldc, first); break;
    case 1: panel_tile<1>(a + r * lda, lda, b, kc, c + r * ldc, ldc, first); break;
    default: break;
  }
}

// float32 -> bfloat16, round to nearest even (NaN stays NaN), 8 at a time
static inline void store_bf16x8(c10::BFloat16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// What is done with a finished block of C (rows x 16 float32 sums): bias and residual added in float32, stored as
// float32 or bfloat16 (rounded once)
struct PanelEpilogue {
  const float* bias;      // [N] or null
  const void* residual;   // [M, N] float32 or bfloat16, or null
  bool residual_bf16;
  void* out;              // [M, N] float32 or bfloat16
  bool out_bf16;
  bool direct() const { return !bias && !residual && !out_bf16; }  // sums go straight to out
};

static void panel_finish(const float* c, int64_t ldc, int64_t rows, int64_t r0, int64_t n0, int64_t N,
                         const PanelEpilogue& e) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < PANEL_NR; h += 8) {
      const int64_t at = (r0 + r) * N + n0 + h;
      __m256 v = _mm256_loadu_ps(c + r * ldc + h);
      if (e.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(e.bias + n0 + h));
      if (e.residual)
        v = _mm256_add_ps(v, e.residual_bf16 ? panel_load(static_cast<const c10::BFloat16*>(e.residual) + at)
                                             : _mm256_loadu_ps(static_cast<const float*>(e.residual) + at));
      if (e.out_bf16)
        store_bf16x8(static_cast<c10::BFloat16*>(e.out) + at, v);
      else
        _mm256_storeu_ps(static_cast<float*>(e.out) + at, v);
    }
}

// out[M, N] = x[M, K] float32 . wp^T (+ epilogue) for panels [p0, p1) of the weight. Per row block and panel the
// K blocks run back to back, so the block's sums stay in L1 (a [PANEL_MC, 16] scratch when an epilogue follows),
// the panel is read front to back, and no [M, N] float32 buffer is written twice.
template <typename W>
static void panel_gemm_range(const float* x, const W* wp, int64_t M, int64_t N, int64_t K, int64_t p0, int64_t p1,
                             const PanelEpilogue& e) {
  const int64_t nk = (K + PANEL_KC - 1) / PANEL_KC, kc = (K + nk - 1) / nk;  // equal K blocks
  // rows a block: all of them up to PANEL_MC; past that as many as keep the block's rows of x in PANEL_A_BYTES
  const int64_t mc = M <= PANEL_MC ? M
                                   : std::clamp<int64_t>(PANEL_A_BYTES / (4 * K) / PANEL_MR * PANEL_MR, PANEL_MR,
                                                         PANEL_MC);
  alignas(64) float scratch[PANEL_MC * PANEL_NR];
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t m = std::min(mc, M - m0);
    for (int64_t p = p0; p < p1; ++p) {
      float* c = e.direct() ? static_cast<float*>(e.out) + m0 * N + p * PANEL_NR : scratch;
      const int64_t ldc = e.direct() ? N : PANEL_NR;
      for (int64_t k0 = 0; k0 < K; k0 += kc)
        panel_rows(x + m0 * K + k0, K, wp + (p * K + k0) * PANEL_NR, std::min(kc, K - k0), c, ldc, m, k0 == 0);
      if (!e.direct()) panel_finish(scratch, PANEL_NR, m, m0, p * PANEL_NR, N, e);
    }
  }
}
#endif

// [M, K] float32 x [N / 16, K, 16] float32 or bfloat16 panels (+ bias [N] float32) (+ residual [M, N] float32 or
// bfloat16, added in float32) -> [M, N] float32, or bfloat16 rounded once with out_bf16
torch::Tensor panel_gemm(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                         const c10::optional<torch::Tensor>& residual, bool out_bf16) {
  TORCH_CHECK(panel_gemm_ok, "panel_gemm: built without AVX2 + FMA (or with AVX-512, where oneDNN serves)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(),
              "panel_gemm: x must be contiguous [M, K] float32");
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == PANEL_NR && wp.size(1) == x.size(1) && wp.is_contiguous() &&
                  (wp.scalar_type() == torch::kFloat || wp.scalar_type() == torch::kBFloat16),
              "panel_gemm: weight must be float32 or bfloat16 panels [N / 16, K, 16] with x's K");
  const int64_t M = x.size(0), K = x.size(1), P = wp.size(0), N = P * PANEL_NR;
  if (bias) TORCH_CHECK(bias->scalar_type() == torch::kFloat && bias->numel() == N && bias->is_contiguous(),
                        "panel_gemm: bias must be [N] float32");
  if (residual) TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N &&
                            residual->is_contiguous() && (residual->scalar_type() == torch::kFloat ||
                                                          residual->scalar_type() == torch::kBFloat16),
                            "panel_gemm: residual must be contiguous [M, N] float32 or bfloat16");
  auto out = torch::empty({M, N}, x.options().dtype(out_bf16 ? torch::kBFloat16 : torch::kFloat));
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  const PanelEpilogue e{bias ? bias->data_ptr<float>() : nullptr, residual ? residual->data_ptr() : nullptr,
                        residual && residual->scalar_type() == torch::kBFloat16, out.data_ptr(), out_bf16};
  const float* xp = x.data_ptr<float>();
  // the panels split evenly between the threads (with fewer panels than threads, one each)
  const int64_t threads = std::max(1, at::get_num_threads());
  at::parallel_for(0, P, std::max<int64_t>(1, (P + threads - 1) / threads), [&](int64_t p0, int64_t p1) {
    if (wp.scalar_type() == torch::kBFloat16)
      panel_gemm_range(xp, wp.data_ptr<c10::BFloat16>(), M, N, K, p0, p1, e);
    else
      panel_gemm_range(xp, wp.data_ptr<float>(), M, N, K, p0, p1, e);
  });
#endif
  return out;
}
