// tokenmill's C++ CPU kernels (attention over the paged KV cache, the K/V store, and varlen attention over packed sequences), compiled on first use by tokenmill/kernels/cpu_kernel.py as one module with
// the other cpu_*.cpp files, in the order it lists them (later files use earlier ones): see its docstring.

// Attention of one query token (q: [H, D] float, pre-scaled) over the first L cached tokens of one sequence, read
// block by block through its block table: each block's token rows (all KV heads, contiguous) are read once per pass
// and shared by the G = H / Hkv query heads of each KV group. Two passes: scores then softmax, then P.V.
// With a bfloat16 cache on a CPU with AVX512-BF16 (and D % 32 == 0), pass 1 multiplies the raw bfloat16 q (``qb``)
// and K rows (dot_bf16) and applies ``scale`` to the scores, instead of converting K to float first.
// Only keys first .. L - 1 are attended (a sliding window: first = L - window); softcap > 0 caps the scores
// (softcap * tanh(score / softcap), Gemma 2) before the softmax. Scores stay indexed by key position.
template <typename scalar_t, typename cache_t, int NV>
static void attend(const float* qf, const scalar_t* qb, float scale, const cache_t* kp, const cache_t* vp,
                   const int64_t* table, int64_t first, int64_t L, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                   float softcap, std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& tile,
                   std::vector<float>& inv, scalar_t* out) {
  constexpr bool is_float = std::is_same_v<cache_t, float>;
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;  // one token's K (or V) for all KV heads; rows of a block are contiguous
  const int64_t nblocks = (L + bs - 1) / bs, j0 = first / bs;
  if (static_cast<int64_t>(scores.size()) < H * L) scores.resize(H * L);
  // The n float rows of block j of `cache` (converted into `tile` unless the cache is float); block j + 1 prefetched.
  auto block_rows = [&](const cache_t* cache, int64_t j, int64_t n) -> const float* {
    if (j + 1 < nblocks) prefetch_block(cache + table[j + 1] * bs * row, std::min(bs, L - (j + 1) * bs) * row);
    if constexpr (is_float) {
      return cache + table[j] * bs * row;
    } else {
      to_float(cache + table[j] * bs * row, tile.data(), n * row);
      return tile.data();
    }
  };
  // pass 1: scores[h][t] = q_h . k_t
  if (qb != nullptr) {
    const uint16_t* q16 = reinterpret_cast<const uint16_t*>(qb);
    for (int64_t j = j0; j < nblocks; ++j) {
      const int64_t n = std::min(bs, L - j * bs), t1 = std::max<int64_t>(0, first - j * bs);
      for (int64_t a = 1; a <= PREFETCH_BLOCKS; ++a)
        if (j + a < nblocks) {
          prefetch_block(kp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
          prefetch_block(vp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
        }
      const uint16_t* rows = reinterpret_cast<const uint16_t*>(kp + table[j] * bs * row);
      for (int64_t t = t1; t < n; ++t)
        for (int64_t h = 0; h < H; ++h)
          scores[h * L + j * bs + t] = scale * dot_bf16(q16 + h * D, rows + t * row + (h / G) * D, D);
    }
  } else {
    for (int64_t j = j0; j < nblocks; ++j) {
      const int64_t n = std::min(bs, L - j * bs), t1 = std::max<int64_t>(0, first - j * bs);
      for (int64_t a = 1; a <= PREFETCH_BLOCKS; ++a)
        if (j + a < nblocks) {
          prefetch_block(kp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
          prefetch_block(vp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
        }
      const float* rows = block_rows(kp, j, n);
      for (int64_t t = t1; t < n; ++t)
        for (int64_t h = 0; h < H; ++h)
          scores[h * L + j * bs + t] = dot<NV>(qf + h * D, rows + t * row + (h / G) * D, D);
    }
  }
  // softmax numerators; 1/sum is applied to the output
  for (int64_t h = 0; h < H; ++h) {
    if (softcap > 0.f) cap_scores(scores.data() + h * L + first, L - first, softcap);
    inv[h] = softmax_numerators(scores.data() + h * L + first, L - first);
  }
  // pass 2: acc_h = sum_t p[h][t] v_t
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t j = j0; j < nblocks; ++j) {
    const int64_t n = std::min(bs, L - j * bs), t1 = std::max<int64_t>(0, first - j * bs);
    const float* rows = block_rows(vp, j, n);
    for (int64_t h = 0; h < H; ++h)
      axpy_rows<NV>(acc.data() + h * D, scores.data() + h * L + j * bs + t1, rows + t1 * row + (h / G) * D, row,
                    n - t1, D);
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv[h]);
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// The vector unit attend_simd runs on: L float lanes a register (AVX-512: 16 of 32 registers; AVX2: 8 of 16), loads
// of float and bfloat16 cache rows (widened in the register: a shift), and sum_lanes: the L lane sums of L registers
// in one register, the register holding token t's products at index row_of(t) (so the sums come out in token order).
#if defined(__AVX512F__)
struct Simd {
  using reg = __m512;
  static constexpr int L = 16;
  static constexpr int ACC = 256;  // pv_block's accumulators, in lanes: HB heads x D lanes in 16 of the 32 registers
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, reg a) { _mm512_storeu_ps(p, a); }
  static void store_first(float* p, reg a, int64_t m) {  // lanes 0 .. m - 1
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << m) - 1), a);
  }
  // lane l holds the sum of a[4 * (l % 4) + l / 4]'s lanes (a transposition, its own inverse). Three rounds of
  // shuffle-and-add, 45 instructions for 16 sums where a horizontal sum each takes ~8.
  static constexpr int row_of(int t) { return 4 * (t % 4) + t / 4; }
  static reg sum_lanes(const reg* a) {
    __m512 c[8], d[4];
    for (int i = 0; i < 8; ++i)  // c[i] = [a[2i] q0+q2, q1+q3 | a[2i+1] q0+q2, q1+q3] (q: 128-bit quarters)
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)  // quarter k of d[i]: 4 partial sums of a[4i + k]
      d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
    const __m512 e0 = _mm512_add_ps(_mm512_unpacklo_ps(d[0], d[1]), _mm512_unpackhi_ps(d[0], d[1]));
    const __m512 e1 = _mm512_add_ps(_mm512_unpacklo_ps(d[2], d[3]), _mm512_unpackhi_ps(d[2], d[3]));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(e0), _mm512_castps_pd(e1))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(e0), _mm512_castps_pd(e1))));
  }
};
// 16 cache values as 16 float lanes (cpu_int8.cpp's bfloat16 activations use it too)
template <typename T>
static inline __m512 load_f32x16(const T* p) { return Simd::load(p); }
#else
struct Simd {
  using reg = __m256;
  static constexpr int L = 8;
  static constexpr int ACC = 64;  // pv_block's accumulators, in lanes: HB heads x D lanes in 8 of the 16 registers
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load(const c10::BFloat16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, reg a) { _mm256_storeu_ps(p, a); }
  static void store_first(float* p, reg a, int64_t m) {  // lanes 0 .. m - 1
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(m)), lane), a);
  }
  // lane l holds the sum of a[l]'s lanes: two rounds of pairwise adds within 128-bit halves (vhaddps), then the
  // halves added across
  static constexpr int row_of(int t) { return t; }
  static reg sum_lanes(const reg* a) {
    const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // a0..a3 | a0..a3
    const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));  // a4..a7 | a4..a7
    return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
  }
};
#endif

// scores[t0 + t] for t < m (m <= L) of one query head against the K rows at k + (t0 + t) * row: each row's products
// stay in a register (L lanes) and Simd::sum_lanes adds all L rows' lanes at once. Rows past m repeat row m - 1 (their
// sums are not stored). With RAW (bfloat16 cache, AVX512-BF16) the raw bfloat16 q and K rows are multiplied
// (vdpbf16ps) and the sums scaled after; otherwise K is widened to float and multiplied by the pre-scaled float q.
template <typename cache_t, int NV, bool RAW>
static inline void score_rows(const float* qf, const uint16_t* q16, float scale, const cache_t* k, int64_t row,
                              int64_t m, float* scores) {
  constexpr int R = 16 * NV / Simd::L;  // registers a row
  typename Simd::reg part[Simd::L];
  for (int i = 0; i < Simd::L; ++i) {
    const cache_t* kr = k + std::min<int64_t>(Simd::row_of(i), m - 1) * row;
    if constexpr (RAW) {
#if defined(__AVX512BF16__)
      const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kr);
      __m512 a = _mm512_setzero_ps();
      for (int v = 0; v < NV / 2; ++v)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q16 + 32 * v), (__m512bh)_mm512_loadu_si512(k16 + 32 * v));
      part[i] = a;
#endif
    } else {
      auto a = Simd::mul(Simd::load(qf), Simd::load(kr));
      for (int v = 1; v < R; ++v) a = Simd::fma(Simd::load(qf + Simd::L * v), Simd::load(kr + Simd::L * v), a);
      part[i] = a;
    }
  }
  auto s = Simd::sum_lanes(part);
  if constexpr (RAW) s = Simd::mul(s, Simd::set1(scale));
  Simd::store_first(scores, s, m);
}

// acc[b][0:D] += sum_t p[b][t] * v_t for HB query heads of one KV group over one block's n V rows (v_t at
// v + t * row): each V register is widened once and feeds the HB heads, whose accumulators stay in registers; a
// row wider than Simd::ACC / HB lanes is done in column chunks that fit (AVX2's 16 registers and D = 128).
template <typename cache_t, int NV, int HB>
static inline void pv_block(float* const* acc, const float* const* p, const cache_t* v, int64_t row, int64_t n) {
  constexpr int R = 16 * NV / Simd::L, C = std::max(1, std::min(R, Simd::ACC / (HB * Simd::L)));
  for (int c0 = 0; c0 < R; c0 += C) {
    const int c1 = std::min(R, c0 + C);
    typename Simd::reg a[HB][C];
    for (int b = 0; b < HB; ++b)
      for (int i = c0; i < c1; ++i) a[b][i - c0] = Simd::load(acc[b] + Simd::L * i);
    for (int64_t t = 0; t < n; ++t) {
      typename Simd::reg pt[HB];
      for (int b = 0; b < HB; ++b) pt[b] = Simd::set1(p[b][t]);
      for (int i = c0; i < c1; ++i) {
        const auto x = Simd::load(v + t * row + Simd::L * i);
        for (int b = 0; b < HB; ++b) a[b][i - c0] = Simd::fma(pt[b], x, a[b][i - c0]);
      }
    }
    for (int b = 0; b < HB; ++b)
      for (int i = c0; i < c1; ++i) Simd::store(acc[b] + Simd::L * i, a[b][i - c0]);
  }
}

// attend() for float, bfloat16 and fp8 caches with D = 16 * NV on AVX-512 or AVX2: the same two passes, with K rows
// scored L at a time (score_rows) and V rows widened in registers, once per KV group, instead of into a float tile
// (an fp8 block still goes through the tile: converting it once beats converting each row for every head).
// HB: query heads per register block in pass 2 (a group of G heads runs in ceil(G / HB) blocks; a last, partial
// block repeats its last head, whose duplicate sums are stored twice, identically).
template <typename scalar_t, typename cache_t, int NV, int HB>
static void attend_simd(const float* qf, const scalar_t* qb, float scale, const cache_t* kp, const cache_t* vp,
                        const int64_t* table, int64_t first, int64_t L, int64_t H, int64_t Hkv, int64_t bs,
                        float softcap, std::vector<float>& scores, std::vector<float>& acc,
                        std::vector<float>& tile, std::vector<float>& inv, scalar_t* out) {
  constexpr int64_t D = 16 * NV;
  constexpr bool convert = std::is_same_v<cache_t, c10::Float8_e4m3fn>;
  // A float8 block is converted into `tile` once (each row then feeds G heads): into bfloat16 (exact: e4m3's 3
  // mantissa bits fit) when q is bfloat16 and the CPU multiplies bfloat16 pairs, so K rows take the raw path below,
  // else into float. Float and bfloat16 rows are read in place (bfloat16 widened in registers: a shift).
  constexpr bool to_bf16 = convert && std::is_same_v<scalar_t, c10::BFloat16> && bf16_dot_ok;
  using row_t = std::conditional_t<convert, std::conditional_t<to_bf16, c10::BFloat16, float>, cache_t>;
  constexpr bool raw = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<row_t, c10::BFloat16> &&
                       bf16_dot_ok;
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;
  const int64_t nblocks = (L + bs - 1) / bs, j0 = first / bs;
  if (static_cast<int64_t>(scores.size()) < H * L) scores.resize(H * L);
  const uint16_t* q16 = reinterpret_cast<const uint16_t*>(qb);
  auto block_rows = [&](const cache_t* cache, int64_t j, int64_t n) -> const row_t* {
    if constexpr (to_bf16) {
      fp8_to_bf16(cache + table[j] * bs * row, reinterpret_cast<c10::BFloat16*>(tile.data()), n * row);
      return reinterpret_cast<const c10::BFloat16*>(tile.data());
    } else if constexpr (convert) {
      to_float(cache + table[j] * bs * row, tile.data(), n * row);
      return tile.data();
    } else {
      return cache + table[j] * bs * row;
    }
  };
  for (int64_t j = j0; j < nblocks; ++j) {  // pass 1: scores[h][t] = q_h . k_t
    const int64_t n = std::min(bs, L - j * bs), t1 = std::max<int64_t>(0, first - j * bs);
    for (int64_t a = 1; a <= PREFETCH_BLOCKS; ++a)
      if (j + a < nblocks) {
        prefetch_block(kp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
        prefetch_block(vp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
      }
    const auto* rows = block_rows(kp, j, n);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t0 = t1; t0 < n; t0 += Simd::L)
        score_rows<row_t, NV, raw>(qf + h * D, q16 + h * D, scale, rows + t0 * row + (h / G) * D, row,
                                   std::min<int64_t>(Simd::L, n - t0), scores.data() + h * L + j * bs + t0);
  }
  for (int64_t h = 0; h < H; ++h) {
    if (softcap > 0.f) cap_scores(scores.data() + h * L + first, L - first, softcap);
    inv[h] = softmax_numerators(scores.data() + h * L + first, L - first);
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t j = j0; j < nblocks; ++j) {  // pass 2: acc_h = sum_t p[h][t] v_t
    const int64_t n = std::min(bs, L - j * bs), t1 = std::max<int64_t>(0, first - j * bs);
    const auto* rows = block_rows(vp, j, n);
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += HB) {
        float* accs[HB];
        const float* ps[HB];
        for (int b = 0; b < HB; ++b) {
          const int64_t h = std::min(h0 + b, (g + 1) * G - 1);
          accs[b] = acc.data() + h * D;
          ps[b] = scores.data() + h * L + j * bs + t1;
        }
        pv_block<row_t, NV, HB>(accs, ps, rows + t1 * row + g * D, row, n - t1);
      }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv[h]);
}
#endif

// Every token of the flat batch attends causally: token j (0-based) of request r's q_len new tokens sees the first
// seq_lens[r] - q_len + j + 1 cached tokens. Decodes (q_len 1) and prefill chunks alike; one task per token, and the
// tokens are split between threads by their cost (the number of keys they read), not by their count.
// window > 0: a token sees only its last `window` keys (a sliding window); softcap > 0: scores are capped.
template <typename scalar_t, typename cache_t, int NV>
static void paged_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                       const torch::Tensor& query_start_loc, double scale, torch::Tensor& out, int64_t skip_q,
                       int64_t window, float softcap) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t R = seq_lens.size(0);
  const int64_t max_blocks = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const cache_t* kp = static_cast<const cache_t*>(k_cache.data_ptr());
  const cache_t* vp = static_cast<const cache_t*>(v_cache.data_ptr());
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t* qs = query_start_loc.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  const bool raw_bf16 = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<cache_t, c10::BFloat16> &&
                        bf16_dot_ok && D % 32 == 0;

  // per token: its request, its visible length; tokens of requests with at least skip_q new tokens (skip_q > 0)
  // are left out (another kernel attends them) and cost nothing
  std::vector<int64_t> req(T), len(T), cost(T + 1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t q_len = qs[r + 1] - qs[r];
    TORCH_CHECK(q_len >= 1 && q_len <= lp[r], "each request needs 1 <= query length <= seq_len");
    for (int64_t i = qs[r]; i < qs[r + 1]; ++i) {
      req[i] = r;
      len[i] = skip_q > 0 && q_len >= skip_q ? 0 : lp[r] - q_len + (i - qs[r]) + 1;
    }
  }
  std::vector<int64_t> first(T, 0);  // each token's first visible key
  if (window > 0)
    for (int64_t i = 0; i < T; ++i) first[i] = std::max<int64_t>(0, len[i] - window);
  for (int64_t i = 0; i < T; ++i)  // + a fixed per-token cost
    cost[i + 1] = cost[i] + (len[i] > 0 ? len[i] - first[i] + 16 : 0);
  const std::vector<int64_t> bounds = split_by_cost(cost);
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  using attend_fn = void (*)(const float*, const scalar_t*, float, const cache_t*, const cache_t*, const int64_t*,
                             int64_t, int64_t, int64_t, int64_t, int64_t, float, std::vector<float>&,
                             std::vector<float>&, std::vector<float>&, std::vector<float>&, scalar_t*);
  attend_fn fast = nullptr;  // attend_simd for this head count per KV group, where it applies
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  if constexpr (NV > 0 && (std::is_same_v<cache_t, float> || std::is_same_v<cache_t, c10::BFloat16> ||
                           std::is_same_v<cache_t, c10::Float8_e4m3fn>)) {
    // heads a register block in pass 2: as many as keep HB x D accumulators in registers (D = 16 NV lanes)
    switch (std::min<int64_t>(H / Hkv, std::max(1, Simd::ACC / (16 * NV)))) {
      case 1: fast = attend_simd<scalar_t, cache_t, NV, 1>; break;
      case 2: fast = attend_simd<scalar_t, cache_t, NV, 2>; break;
      case 3: fast = attend_simd<scalar_t, cache_t, NV, 3>; break;
      default: fast = attend_simd<scalar_t, cache_t, NV, 4>; break;
    }
  }
#endif
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<float> qf(H * D), acc(H * D), tile(bs * Hkv * D), scores, inv(H);
    for (int64_t p = pbegin; p < pend; ++p)
      for (int64_t i = bounds[p]; i < bounds[p + 1]; ++i) {
        if (len[i] == 0) continue;  // skipped (skip_q)
        if (i + 1 < bounds[p + 1]) {  // the next query's first blocks, read while this one computes
          const int64_t* next = tp + req[i + 1] * max_blocks;
          const int64_t a0 = first[i + 1] / bs, a1 = std::min(a0 + PREFETCH_BLOCKS, (len[i + 1] + bs - 1) / bs);
          for (int64_t a = a0; a < a1; ++a) {
            prefetch_block(kp + next[a] * bs * Hkv * D, bs * Hkv * D);
            prefetch_block(vp + next[a] * bs * Hkv * D, bs * Hkv * D);
          }
        }
        to_float(qp + i * H * D, qf.data(), H * D);
        for (int64_t e = 0; e < H * D; ++e) qf[e] *= fscale;
        if (fast != nullptr) {
          fast(qf.data(), qp + i * H * D, fscale, kp, vp, tp + req[i] * max_blocks, first[i], len[i], H, Hkv, bs,
               softcap, scores, acc, tile, inv, op + i * H * D);
          continue;
        }
        attend<scalar_t, cache_t, NV>(qf.data(), raw_bf16 ? qp + i * H * D : nullptr, fscale, kp, vp,
                                      tp + req[i] * max_blocks, first[i], len[i], H, Hkv, D, bs, softcap, scores,
                                      acc, tile, inv, op + i * H * D);
      }
  });
}

template <typename scalar_t, typename cache_t>
static void paged_dispatch(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                           const torch::Tensor& query_start_loc, double scale, torch::Tensor& out,
                           int64_t skip_q = 0, int64_t window = 0, double softcap = 0.0) {
  auto run = [&](auto nv) {
    paged_impl<scalar_t, cache_t, decltype(nv)::value>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                       scale, out, skip_q, window, static_cast<float>(softcap));
  };
  switch (q.size(2)) {  // head_dim: unrolled for the common sizes
    case 32: return run(std::integral_constant<int, 2>{});
    case 64: return run(std::integral_constant<int, 4>{});
    case 128: return run(std::integral_constant<int, 8>{});
    case 256: return run(std::integral_constant<int, 16>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A register block of RB query rows against keys held as float K^T [D][ldk] and V [nk][D] (the tiled kernels: the
// embedding path's varlen_attention, and paged prefill in cpu_prefill.cpp): scores as broadcast-FMAs over 16 keys at
// a time, each K^T vector shared by the RB rows, the softmax per row, then P.V as broadcast-FMAs over D, each V row
// shared by the RB rows. qf [RB][D]: the queries, already times the scale. Row r sees keys firsts[r] .. lens[r] - 1
// (firsts nullptr: from 0; lens[r] <= nk; ldk a multiple of KEY_PAD >= nk: K^T columns past nk up to the next
// multiple of KEY_PAD are read but their scores never used); scores are computed from the rows' first key (rounded
// down to the step of 16 * KB keys), so a sliding window skips the keys no row sees. softcap > 0: scores capped
// (cap_scores) before the softmax.
// of [RB][D] <- the unnormalised outputs, inv[r] <- 1 / row r's softmax sum; sc: RB rows of ldk floats of scratch.
// RB (8 for head_dim <= 32, 4 for 64, 2 for 128 and 256) and NV = head_dim / 16 (0: any head_dim, scalar P.V): enough
// independent FMA chains to cover the FMA latency, few enough accumulators to stay in registers.
constexpr int64_t KEY_PAD = 64;  // attend_rows' K^T row length (ldk) is a multiple of this

template <int NV, int RB>
static inline void attend_rows(const float* qf, const float* kt, int64_t ldk, const float* vf, int64_t nk,
                               const int64_t* lens, int64_t head_dim, float* sc, float* of, float* inv,
                               const int64_t* firsts = nullptr, float softcap = 0.f) {
  // a compile-time head_dim where NV fixes it: the rows' query and output offsets are then immediates, not registers
  const int64_t D = NV > 0 ? 16 * NV : head_dim;
  // K^T vectors per step: with AVX-512 (one register per vec16, 32 registers) RB * KB >= 8 independent FMA chains;
  // narrower vec16s are already 2 or 4 chains each, and KB > 1 would spill their 16 registers
#if defined(__AVX512F__)
  constexpr int KB = RB >= 8 ? 1 : 8 / RB;
#else
  constexpr int KB = 1;
#endif
  const int64_t nkp = (nk + 16 * KB - 1) / (16 * KB) * (16 * KB);
  int64_t k0 = 0;  // the first key any row sees, down to a step boundary (so k0 + steps never pass nkp <= ldk)
  if (firsts != nullptr) {
    k0 = firsts[0];
    for (int r = 1; r < RB; ++r) k0 = std::min(k0, firsts[r]);
    k0 = k0 / (16 * KB) * (16 * KB);
  }
  for (int64_t j = k0; j < nkp; j += 16 * KB) {  // sc[r][j] = q_r . k_j
    vec16 a[RB][KB] = {};
    for (int64_t d = 0; d < D; ++d) {
      vec16 kv[KB];
      for (int b = 0; b < KB; ++b) kv[b] = load16(kt + d * ldk + j + 16 * b);
      for (int r = 0; r < RB; ++r) {
        const float qv = qf[r * D + d];
        for (int b = 0; b < KB; ++b) a[r][b] += qv * kv[b];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int b = 0; b < KB; ++b) store16(sc + r * ldk + j + 16 * b, a[r][b]);
  }
  for (int r = 0; r < RB; ++r) {
    float* sr = sc + r * ldk;
    const int64_t f = firsts != nullptr ? firsts[r] : 0;
    if (softcap > 0.f) cap_scores(sr + f, lens[r] - f, softcap);
    inv[r] = softmax_numerators(sr + f, lens[r] - f);
    for (int64_t j = k0; j < f; ++j) sr[j] = 0.f;  // before the window: no weight
    for (int64_t j = lens[r]; j < nk; ++j) sr[j] = 0.f;  // causal: later keys get no weight
  }
  if constexpr (NV > 0) {  // of_r = sum_j p_r[j] v_j, CH vec16 columns per pass (RB * CH accumulators in registers)
    constexpr int CH = NV > 8 ? 8 : NV;
    for (int c0 = 0; c0 < NV; c0 += CH) {
      vec16 a[RB][CH] = {};
      for (int64_t j = k0; j < nk; ++j) {
        vec16 vv[CH];
        for (int i = 0; i < CH; ++i) vv[i] = load16(vf + j * D + 16 * (c0 + i));
        for (int r = 0; r < RB; ++r) {
          const float pr = sc[r * ldk + j];
          for (int i = 0; i < CH; ++i) a[r][i] += pr * vv[i];
        }
      }
      for (int r = 0; r < RB; ++r)
        for (int i = 0; i < CH; ++i) store16(of + r * D + 16 * (c0 + i), a[r][i]);
    }
  } else {
    std::fill(of, of + RB * D, 0.f);
    for (int64_t j = k0; j < nk; ++j)
      for (int r = 0; r < RB; ++r)
        for (int64_t d = 0; d < D; ++d) of[r * D + d] += sc[r * ldk + j] * vf[j * D + d];
  }
}

// fn(NV, RB) as integral constants for attend_rows, by head_dim D: unrolled for the common sizes (NV = D / 16, RB
// from the register budget), NV = 0 (any D) otherwise.
template <typename F>
static void with_attend_shape(int64_t D, F&& fn) {
  using std::integral_constant;
  switch (D) {
    case 16: return fn(integral_constant<int, 1>{}, integral_constant<int, 8>{});
    case 32: return fn(integral_constant<int, 2>{}, integral_constant<int, 8>{});
    case 64: return fn(integral_constant<int, 4>{}, integral_constant<int, 4>{});
    case 128: return fn(integral_constant<int, 8>{}, integral_constant<int, 2>{});
    case 256: return fn(integral_constant<int, 16>{}, integral_constant<int, 2>{});  // Gemma
    default: return fn(integral_constant<int, 0>{}, integral_constant<int, 4>{});
  }
}

// Attention over packed variable-length sequences with no cache (the embedding path): sequence s owns rows
// cu_seqlens[s] .. cu_seqlens[s + 1] of q, k and v, and each of its queries attends to all of its keys (or, causal,
// to keys 0..i). One task per (sequence, KV head): the head's K is transposed into float [D][Lp] (Lp: L rounded up
// to KEY_PAD) and its V converted to float [L][D] once, then the query rows of each head of the group go through
// attend_rows RB at a time. For head_dim 32 this runs at several times the rate of the SDPA kernels.
template <typename scalar_t, int NV, int RB>
static void varlen_task(const scalar_t* qp, const scalar_t* kp, const scalar_t* vp, int64_t q_stride,
                        int64_t k_stride, int64_t v_stride, int64_t start, int64_t L, int64_t kvh, int64_t G,
                        int64_t D, float scale, bool causal, float* kt, float* vf, float* sc, float* qf, float* of,
                        float* row, scalar_t* op, int64_t H) {
  const int64_t Lp = (L + KEY_PAD - 1) / KEY_PAD * KEY_PAD;
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * Lp + L, kt + (d + 1) * Lp, 0.f);
  for (int64_t j = 0; j < L; ++j) {
    to_float(kp + (start + j) * k_stride + kvh * D, row, D);
    for (int64_t d = 0; d < D; ++d) kt[d * Lp + j] = row[d];
    to_float(vp + (start + j) * v_stride + kvh * D, vf + j * D, D);
  }
  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = kvh * G + g;
    for (int64_t i0 = 0; i0 < L; i0 += RB) {
      const int64_t nr = std::min<int64_t>(RB, L - i0);
      int64_t lens[RB];
      for (int64_t r = 0; r < RB; ++r) {  // rows past the end repeat the last row: computed, never stored
        to_float(qp + (start + i0 + std::min<int64_t>(r, nr - 1)) * q_stride + h * D, qf + r * D, D);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] *= scale;
        lens[r] = causal ? std::min<int64_t>(i0 + r + 1, L) : L;  // this row's visible keys
      }
      float inv[RB];
      attend_rows<NV, RB>(qf, kt, Lp, vf, causal ? i0 + nr : L, lens, D, sc, of, inv);
      for (int64_t r = 0; r < nr; ++r) {
        scalar_t* o = op + (start + i0 + r) * H * D + h * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<scalar_t>(of[r * D + d] * inv[r]);
      }
    }
  }
}

template <typename scalar_t, int NV, int RB>
static void varlen_impl(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& cu_seqlens, double scale, bool causal, torch::Tensor& out) {
  const int64_t H = q.size(1), D = q.size(2), Hkv = k.size(1), G = H / Hkv;
  const int64_t S = cu_seqlens.size(0) - 1;
  const int64_t* cu = cu_seqlens.data_ptr<int64_t>();
  int64_t max_len = 0;
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(cu[s + 1] >= cu[s], "cu_seqlens must be non-decreasing");
    max_len = std::max(max_len, cu[s + 1] - cu[s]);
  }
  // tasks (sequence, KV head), split between threads by cost (~L^2 each, + a fixed part)
  const int64_t ntask = S * Hkv;
  std::vector<int64_t> cost(ntask + 1, 0);
  for (int64_t t = 0; t < ntask; ++t) {
    const int64_t L = cu[t / Hkv + 1] - cu[t / Hkv];
    cost[t + 1] = cost[t] + L * (L + 16) * G;
  }
  const std::vector<int64_t> bounds = split_by_cost(cost);
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t Lp = (max_len + KEY_PAD - 1) / KEY_PAD * KEY_PAD;
  at::parallel_for(0, parts, 1, [&](int64_t pbegin, int64_t pend) {
    std::vector<float> kt(D * Lp), vf(Lp * D), sc(RB * Lp), qf(RB * D), of(RB * D), row(D);
    for (int64_t p = pbegin; p < pend; ++p)
      for (int64_t t = bounds[p]; t < bounds[p + 1]; ++t) {
        const int64_t s = t / Hkv, L = cu[s + 1] - cu[s];
        if (L == 0) continue;
        varlen_task<scalar_t, NV, RB>(qp, kp, vp, q.stride(0), k.stride(0), v.stride(0), cu[s], L, t % Hkv, G, D,
                              static_cast<float>(scale), causal, kt.data(), vf.data(), sc.data(), qf.data(),
                              of.data(), row.data(), op, H);
      }
  });
}

// q [T, H, D], k/v [T, Hkv, D]: each may be a row-strided view (heads and head_dim dense), e.g. slices of a fused
// qkv projection. cu_seqlens [S + 1] int64 from 0 to T. Returns [T, H, D] contiguous.
torch::Tensor varlen_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cu_seqlens,
                               double scale, bool causal) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->stride(1) == t->size(2),
                "q, k, v must be [T, heads, head_dim] with dense heads");
  }
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(2) == q.size(2), "q, k, v shapes disagree");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, k, v must share a dtype");
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1 && cu_seqlens.is_contiguous() &&
              cu_seqlens.scalar_type() == at::kLong, "cu_seqlens must be a contiguous int64 vector");
  TORCH_CHECK(cu_seqlens[0].item<int64_t>() == 0 && cu_seqlens[-1].item<int64_t>() == q.size(0),
              "cu_seqlens must run from 0 to num_tokens");
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(), "varlen_attention",
                                  [&] {
    with_attend_shape(q.size(2), [&](auto nv, auto rb) {
      varlen_impl<scalar_t, decltype(nv)::value, decltype(rb)::value>(q, k, v, cu_seqlens, scale, causal, out);
    });
  });
  return out;
}

// The step's new K and V rows into their cache slots: k / v [T, Hkv, D] (rows may be strided, each row contiguous),
// k_cache / v_cache [num_blocks, block_size, Hkv, D] contiguous, slots [T] int64 (block * block_size + offset). Rows of
// the caches' element size are copied as bytes, one memcpy per row (index_copy_ took ~45 us per call for a decode
// step's 128 rows); float32 or bfloat16 rows into a float8 e4m3 cache are cast on the way (to_fp8, bit for bit
// torch's cast: one pass where the cast and the copy were two, and the cast ran at ~3 GB/s).
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous() &&
              slots.scalar_type() == torch::kInt64, "contiguous caches and int64 slots");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == slots.size(0), "k and v: [T, Hkv, D], T slots");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), elem = k.element_size();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k_cache.numel() == num_slots * row && v_cache.sizes() == k_cache.sizes(), "caches must hold rows of Hkv * D");
  const bool cast = k_cache.scalar_type() == c10::ScalarType::Float8_e4m3fn &&
                    (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k.scalar_type(),
              "k and v, and the two caches, must share a dtype");
  TORCH_CHECK(cast || k_cache.element_size() == elem,
              "k, v and the caches must share an element size (or float32 / bfloat16 rows into an fp8 cache)");
  for (const auto& t : {k, v})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), "each row of k and v must be contiguous");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks = k.stride(0) * elem, vs = v.stride(0) * elem, bytes = row * k_cache.element_size();
  const bool bf16 = k.scalar_type() == torch::kBFloat16;
  auto put = [&](char* dst, const char* src) {
    if (!cast) std::memcpy(dst, src, bytes);
    else if (bf16) to_fp8(reinterpret_cast<const c10::BFloat16*>(src), reinterpret_cast<uint8_t*>(dst), row);
    else to_fp8(reinterpret_cast<const float*>(src), reinterpret_cast<uint8_t*>(dst), row);
  };
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      put(kc + sp[t] * bytes, kp + t * ks);
      put(vc + sp[t] * bytes, vp + t * vs);
    }
  });
}

// q [T, H, D] (the flat batch's new tokens); k_cache/v_cache [num_blocks, block_size, Hkv, D] holding every token of
// each request including the new ones, in q's dtype or (float32 / bfloat16 q) float8 e4m3; block_tables [R,
// max_blocks] int64; seq_lens [R] int64; query_start_loc [R + 1] int64. Returns [T, H, D] in q's dtype.
static void check_paged_args(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                             const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                             const torch::Tensor& query_start_loc) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous() && query_start_loc.is_contiguous(),
              "contiguous tables only");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(query_start_loc.size(0) == seq_lens.size(0) + 1, "query_start_loc must have num_reqs + 1 entries");
  TORCH_CHECK(query_start_loc[-1].item<int64_t>() == q.size(0), "query_start_loc must end at num_tokens");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache must share a dtype");
}

// fn(scalar_t{}, cache_t{}) for the (query, cache) dtype pairs the paged kernels take: a float8 e4m3 cache with
// float32 or bfloat16 queries, or a cache in the queries' dtype (float32, float64, bfloat16, float16).
template <typename F>
static void with_paged_types(const torch::Tensor& q, const torch::Tensor& k_cache, F&& fn) {
  if (k_cache.scalar_type() == at::ScalarType::Float8_e4m3fn) {
    TORCH_CHECK(q.scalar_type() == torch::kFloat32 || q.scalar_type() == torch::kBFloat16,
                "a float8 cache takes float32 or bfloat16 queries");
    if (q.scalar_type() == torch::kFloat32) fn(float{}, c10::Float8_e4m3fn{});
    else fn(c10::BFloat16{}, c10::Float8_e4m3fn{});
    return;
  }
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), "the cache must be in q's dtype or float8_e4m3fn");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(), "paged_attention",
                                  [&] { fn(scalar_t{}, scalar_t{}); });
}

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start_loc,
                              double scale) {
  check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
  auto out = torch::empty_like(q);
  with_paged_types(q, k_cache, [&](auto scalar_tag, auto cache_tag) {
    paged_dispatch<decltype(scalar_tag), decltype(cache_tag)>(q, k_cache, v_cache, block_tables, seq_lens,
                                                              query_start_loc, scale, out);
  });
  return out;
}

