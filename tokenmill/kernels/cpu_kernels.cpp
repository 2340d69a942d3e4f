// tokenmill's C++ CPU kernels, compiled on first use by tokenmill/kernels/cpu_kernel.py (load_inline): see its
// docstring for what each kernel does and why.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// 16 floats: one AVX-512 register where the machine has it (a GCC/Clang vector extension type), elsewhere a struct
// of 2 AVX or 4 SSE / NEON vectors of the machine's width with the same operators, so the code stays portable. (A
// 64-byte vector extension type without AVX-512 measured 10-40x slower with GCC 12: it is split through memory;
// the struct's parts stay in registers.) Loads and stores go through memcpy: no alignment assumed. Comparisons go
// through vmax16 / vmin16 / nan_lanes16.
#if defined(__AVX512F__)
typedef float vec16 __attribute__((vector_size(64)));
static inline vec16 load16(const float* p) { vec16 v; std::memcpy(&v, p, sizeof(v)); return v; }
static inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }
static inline vec16 vmax16(vec16 a, vec16 b) { return a > b ? a : b; }
static inline vec16 vmin16(vec16 a, vec16 b) { return a < b ? a : b; }
// 1 in the lanes where v is NaN, else `seen`'s lane
static inline vec16 nan_lanes16(vec16 v, vec16 seen) { return v != v ? vec16{} + 1.f : seen; }
#else
#if defined(__AVX__)
constexpr int VEC_BYTES = 32;
#else
constexpr int VEC_BYTES = 16;
#endif
typedef float vec_native __attribute__((vector_size(VEC_BYTES)));
constexpr int VEC_PARTS = 64 / VEC_BYTES, VEC_LANES = 16 / VEC_PARTS;
struct vec16 {
  vec_native p[VEC_PARTS];
  float operator[](int i) const { return p[i / VEC_LANES][i % VEC_LANES]; }
};
#define TM_AI __attribute__((always_inline)) inline
#define TM_VEC16_OP(op)                                                                             \
  static TM_AI vec16 operator op(vec16 a, vec16 b) {                                                 \
    for (int i = 0; i < VEC_PARTS; ++i) a.p[i] = a.p[i] op b.p[i];                                  \
    return a;                                                                                        \
  }                                                                                                  \
  static TM_AI vec16 operator op(vec16 a, float b) {                                                 \
    for (int i = 0; i < VEC_PARTS; ++i) a.p[i] = a.p[i] op b;                                       \
    return a;                                                                                        \
  }                                                                                                  \
  static TM_AI vec16 operator op(float a, vec16 b) {                                                 \
    for (int i = 0; i < VEC_PARTS; ++i) b.p[i] = a op b.p[i];                                       \
    return b;                                                                                        \
  }                                                                                                  \
  static TM_AI vec16& operator op##=(vec16& a, vec16 b) {                                            \
    for (int i = 0; i < VEC_PARTS; ++i) a.p[i] op##= b.p[i];                                        \
    return a;                                                                                        \
  }
TM_VEC16_OP(+)
TM_VEC16_OP(-)
TM_VEC16_OP(*)
#undef TM_VEC16_OP
static TM_AI vec16 load16(const float* p) {
  vec16 v;
  for (int i = 0; i < VEC_PARTS; ++i) std::memcpy(&v.p[i], p + i * VEC_LANES, VEC_BYTES);
  return v;
}
static TM_AI void store16(float* p, vec16 v) {
  for (int i = 0; i < VEC_PARTS; ++i) std::memcpy(p + i * VEC_LANES, &v.p[i], VEC_BYTES);
}
static TM_AI vec16 vmax16(vec16 a, vec16 b) {
  for (int i = 0; i < VEC_PARTS; ++i) a.p[i] = a.p[i] > b.p[i] ? a.p[i] : b.p[i];
  return a;
}
static TM_AI vec16 vmin16(vec16 a, vec16 b) {
  for (int i = 0; i < VEC_PARTS; ++i) a.p[i] = a.p[i] < b.p[i] ? a.p[i] : b.p[i];
  return a;
}
static TM_AI vec16 nan_lanes16(vec16 v, vec16 seen) {
  for (int i = 0; i < VEC_PARTS; ++i) seen.p[i] = v.p[i] != v.p[i] ? vec_native{} + 1.f : seen.p[i];
  return seen;
}
#undef TM_AI
#endif
static inline float hsum16(vec16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];  // a shuffle tree under -fassociative-math
  return s;
}

// Row conversion to float: a copy for float, a shift for bfloat16 (vectorises), a cast otherwise.
static inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
static inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
// float8 e4m3 (the fp8 KV cache) -> float, exact: the byte's exponent and mantissa bits, moved to bits 20-26 of a
// float, read as the value times 2^-120 (the exponent biases are 127 and 7) for normal and subnormal codes alike, so
// one multiply by 2^120 scales both; the sign moves to bit 31. (Leaving the 2^-120 in and taking it out of the
// scores instead measured 1.8x slower: the rows are then float subnormals.) Code 0x7f (NaN) reads as 480: the cache
// never holds it (torch's cast saturates).
static inline float fp8_to_float(uint8_t b) {
  const uint32_t bits = static_cast<uint32_t>(b & 0x7f) << 20;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return (b & 0x80) ? -(f * 0x1p120f) : f * 0x1p120f;
}
static inline void to_float(const c10::Float8_e4m3fn* src, float* dst, int64_t n) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    const __m512i mag = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)), 20);
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    const __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(mag), _mm512_set1_ps(0x1p120f));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign)));
  }
#endif
  for (; i < n; ++i) dst[i] = fp8_to_float(s[i]);
}
template <typename T>  // half (F16C), double
static inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// float -> storage dtype, round to nearest even like torch's casts (branch-free for bfloat16, so it vectorises).
template <typename T>
static inline T from_float(float f) { return static_cast<T>(f); }
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);  // NaN stays NaN
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// exp(x) for x <= 0 (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp). Branch-free so that the
// softmax loop vectorises; std::exp does not.
static inline float exp_nonpos(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return p * scale;
}

// Items 0..n-1 with prefix costs cost[0..n] (cost[0] = 0) cut into one contiguous range per thread (at most n) of
// about equal cost: range p is bounds[p] .. bounds[p + 1].
static std::vector<int64_t> split_by_cost(const std::vector<int64_t>& cost) {
  const int64_t n = static_cast<int64_t>(cost.size()) - 1;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  std::vector<int64_t> bounds(parts + 1, n);
  bounds[0] = 0;
  for (int64_t p = 1, i = 0; p < parts; ++p) {
    const int64_t target = cost[n] * p / parts;
    while (i < n && cost[i] < target) ++i;
    bounds[p] = i;
  }
  return bounds;
}

// max(s[0:n]), 16 lanes at a time: GCC vectorises a max reduction only under -ffinite-math-only, and the scalar
// loop (a chain of dependent maxss) was half of a long prompt's attention time.
static inline float max_of(const float* s, int64_t n) {
  vec16 mv = vec16{} - INFINITY;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) mv = vmax16(load16(s + j), mv);
  float m = -INFINITY;
  for (int i = 0; i < 16; ++i) m = std::max(m, mv[i]);
  for (; j < n; ++j) m = std::max(m, s[j]);
  return m;
}

// s[0:n] <- exp(scale * (s - max(s))) in place (scale > 0); returns 1 / their sum (applied to the output instead of
// dividing n scores).
static inline float softmax_numerators(float* s, int64_t n, float scale = 1.f) {
  const float m = max_of(s, n);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_nonpos(scale == 1.f ? s[j] - m : scale * (s[j] - m));
    s[j] = e;
    sum += e;
  }
  return 1.f / sum;
}

// Ask for a block's rows before they are needed: blocks sit anywhere in the cache, so the hardware prefetcher loses
// the stream at every block boundary. Decode attention is bound by these reads, so pass 1 asks for the K and the V
// rows of the next PREFETCH_BLOCKS blocks (the V pass then finds its rows in cache), and each query's first blocks
// are asked for while the previous query computes. (Written as plain loops at each call site: the same requests
// through a shared helper measured 50% slower with GCC 12, which compiled them differently.)
constexpr int64_t PREFETCH_BLOCKS = 2;

template <typename scalar_t>
static inline void prefetch_block(const scalar_t* p, int64_t count) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < count * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(c + off);
}

// q . k over D = 16 * NV floats (NV > 0), or over any D with NV == 0.
template <int NV>
static inline float dot(const float* q, const float* k, int64_t D) {
  if constexpr (NV == 0) {
    float s = 0.f;
    for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
    return s;
  } else {
    vec16 a = load16(q) * load16(k);
    for (int i = 1; i < NV; ++i) a += load16(q + 16 * i) * load16(k + 16 * i);
    return hsum16(a);
  }
}

// q . k of two bfloat16 rows, D a multiple of 32, with AVX512-BF16 (vdpbf16ps): the products of two bfloat16 values
// are exact in float32 and accumulate in float32, so this equals converting both rows to float first (up to the
// summation order) at half the multiplies and no conversion. Where the CPU lacks AVX512-BF16, bf16_dot_ok is false.
#if defined(__AVX512BF16__)
static constexpr bool bf16_dot_ok = true;
static inline float dot_bf16(const uint16_t* q, const uint16_t* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
  return _mm512_reduce_add_ps(acc);
}
#else
static constexpr bool bf16_dot_ok = false;
static inline float dot_bf16(const uint16_t*, const uint16_t*, int64_t) { return 0.f; }
#endif

// acc[0:D] += sum_t p[t] * rows[t * stride : t * stride + D] for t < n.
template <int NV>
static inline void axpy_rows(float* acc, const float* p, const float* rows, int64_t stride, int64_t n, int64_t D) {
  if constexpr (NV == 0) {
    for (int64_t t = 0; t < n; ++t)
      for (int64_t d = 0; d < D; ++d) acc[d] += p[t] * rows[t * stride + d];
  } else {
    vec16 a[NV], b[NV];  // two accumulator sets: even and odd t, to halve the FMA dependency chains
    for (int i = 0; i < NV; ++i) { a[i] = load16(acc + 16 * i); b[i] = vec16{}; }
    int64_t t = 0;
    for (; t + 1 < n; t += 2) {
      const float* r0 = rows + t * stride;
      const float* r1 = r0 + stride;
      for (int i = 0; i < NV; ++i) {
        a[i] += p[t] * load16(r0 + 16 * i);
        b[i] += p[t + 1] * load16(r1 + 16 * i);
      }
    }
    if (t < n)
      for (int i = 0; i < NV; ++i) a[i] += p[t] * load16(rows + t * stride + 16 * i);
    for (int i = 0; i < NV; ++i) store16(acc + 16 * i, a[i] + b[i]);
  }
}

// Attention of one query token (q: [H, D] float, pre-scaled) over the first L cached tokens of one sequence, read
// block by block through its block table: each block's token rows (all KV heads, contiguous) are read once per pass
// and shared by the G = H / Hkv query heads of each KV group. Two passes: scores then softmax, then P.V.
// With a bfloat16 cache on a CPU with AVX512-BF16 (and D % 32 == 0), pass 1 multiplies the raw bfloat16 q (``qb``)
// and K rows (dot_bf16) and applies ``scale`` to the scores, instead of converting K to float first.
template <typename scalar_t, typename cache_t, int NV>
static void attend(const float* qf, const scalar_t* qb, float scale, const cache_t* kp, const cache_t* vp,
                   const int64_t* table, int64_t L, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                   std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& tile,
                   std::vector<float>& inv, scalar_t* out) {
  constexpr bool is_float = std::is_same_v<cache_t, float>;
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;  // one token's K (or V) for all KV heads; rows of a block are contiguous
  const int64_t nblocks = (L + bs - 1) / bs;
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
    for (int64_t j = 0; j < nblocks; ++j) {
      const int64_t n = std::min(bs, L - j * bs);
      for (int64_t a = 1; a <= PREFETCH_BLOCKS; ++a)
        if (j + a < nblocks) {
          prefetch_block(kp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
          prefetch_block(vp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
        }
      const uint16_t* rows = reinterpret_cast<const uint16_t*>(kp + table[j] * bs * row);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < H; ++h)
          scores[h * L + j * bs + t] = scale * dot_bf16(q16 + h * D, rows + t * row + (h / G) * D, D);
    }
  } else {
    for (int64_t j = 0; j < nblocks; ++j) {
      const int64_t n = std::min(bs, L - j * bs);
      for (int64_t a = 1; a <= PREFETCH_BLOCKS; ++a)
        if (j + a < nblocks) {
          prefetch_block(kp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
          prefetch_block(vp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
        }
      const float* rows = block_rows(kp, j, n);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < H; ++h)
          scores[h * L + j * bs + t] = dot<NV>(qf + h * D, rows + t * row + (h / G) * D, D);
    }
  }
  // softmax numerators; 1/sum is applied to the output
  for (int64_t h = 0; h < H; ++h) inv[h] = softmax_numerators(scores.data() + h * L, L);
  // pass 2: acc_h = sum_t p[h][t] v_t
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t n = std::min(bs, L - j * bs);
    const float* rows = block_rows(vp, j, n);
    for (int64_t h = 0; h < H; ++h)
      axpy_rows<NV>(acc.data() + h * D, scores.data() + h * L + j * bs, rows + (h / G) * D, row, n, D);
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv[h]);
}

#if defined(__AVX512F__)
// 16 cache values as 16 float lanes: loaded as they are, or widened from bfloat16 (a shift).
static inline __m512 load_f32x16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load_f32x16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The 16 lane sums of a[0..15] in one register: lane l holds the sum of a[4 * (l % 4) + l / 4]'s lanes (a
// transposition, its own inverse: put token t's products in a[4 * (t % 4) + t / 4] to get the sums in token order).
// Three rounds of shuffle-and-add, 45 instructions for 16 sums where a horizontal sum each takes ~8.
static inline __m512 sum_lanes16(const __m512* a) {
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

// scores[t0 + t] for t < m (m <= 16) of one query head against the K rows at k + (t0 + t) * row: each row's products
// stay in a register (16 lanes) and sum_lanes16 adds all 16 rows' lanes at once. Rows past m repeat row m - 1 (their
// sums are not stored). With RAW (bfloat16 cache, AVX512-BF16) the raw bfloat16 q and K rows are multiplied
// (vdpbf16ps) and the sums scaled after; otherwise K is widened to float and multiplied by the pre-scaled float q.
template <typename cache_t, int NV, bool RAW>
static inline void score_rows16(const float* qf, const uint16_t* q16, float scale, const cache_t* k, int64_t row,
                                int64_t m, float* scores) {
  __m512 part[16];
  for (int i = 0; i < 16; ++i) {
    const cache_t* kr = k + std::min<int64_t>(4 * (i % 4) + i / 4, m - 1) * row;
    if constexpr (RAW) {
#if defined(__AVX512BF16__)
      const uint16_t* k16 = reinterpret_cast<const uint16_t*>(kr);
      __m512 a = _mm512_setzero_ps();
      for (int v = 0; v < NV / 2; ++v)
        a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q16 + 32 * v), (__m512bh)_mm512_loadu_si512(k16 + 32 * v));
      part[i] = a;
#endif
    } else {
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qf), load_f32x16(kr));
      for (int v = 1; v < NV; ++v) a = _mm512_fmadd_ps(_mm512_loadu_ps(qf + 16 * v), load_f32x16(kr + 16 * v), a);
      part[i] = a;
    }
  }
  __m512 s = sum_lanes16(part);
  if constexpr (RAW) s = _mm512_mul_ps(s, _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(scores, static_cast<__mmask16>((1u << m) - 1), s);
}

// acc[b][0:D] += sum_t p[b][t] * v_t for HB query heads of one KV group over one block's n V rows (v_t at
// v + t * row): each V row is widened once and feeds the HB heads, whose accumulators stay in registers.
template <typename cache_t, int NV, int HB>
static inline void pv_block(float* const* acc, const float* const* p, const cache_t* v, int64_t row, int64_t n) {
  __m512 a[HB][NV];
  for (int b = 0; b < HB; ++b)
    for (int i = 0; i < NV; ++i) a[b][i] = _mm512_loadu_ps(acc[b] + 16 * i);
  for (int64_t t = 0; t < n; ++t) {
    __m512 x[NV];
    for (int i = 0; i < NV; ++i) x[i] = load_f32x16(v + t * row + 16 * i);
    for (int b = 0; b < HB; ++b) {
      const __m512 pt = _mm512_set1_ps(p[b][t]);
      for (int i = 0; i < NV; ++i) a[b][i] = _mm512_fmadd_ps(pt, x[i], a[b][i]);
    }
  }
  for (int b = 0; b < HB; ++b)
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(acc[b] + 16 * i, a[b][i]);
}

// attend() for float, bfloat16 and fp8 caches with D = 16 * NV on AVX-512: the same two passes, with K rows scored
// 16 at a time (score_rows16) and V rows widened in registers, once per KV group, instead of into a float tile (an
// fp8 block still goes through the tile: converting it once beats converting each row for every head).
// HB: query heads per register block in pass 2 (a group of G heads runs in ceil(G / HB) blocks; a last, partial
// block repeats its last head, whose duplicate sums are stored twice, identically).
template <typename scalar_t, typename cache_t, int NV, int HB>
static void attend_avx512(const float* qf, const scalar_t* qb, float scale, const cache_t* kp, const cache_t* vp,
                          const int64_t* table, int64_t L, int64_t H, int64_t Hkv, int64_t bs,
                          std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& tile,
                          std::vector<float>& inv, scalar_t* out) {
  constexpr int64_t D = 16 * NV;
  constexpr bool raw = std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<cache_t, c10::BFloat16> &&
                       bf16_dot_ok;
  const int64_t G = H / Hkv;
  const int64_t row = Hkv * D;
  const int64_t nblocks = (L + bs - 1) / bs;
  if (static_cast<int64_t>(scores.size()) < H * L) scores.resize(H * L);
  const uint16_t* q16 = reinterpret_cast<const uint16_t*>(qb);
  // A float8 block is converted into `tile` once (each row then feeds G heads); float and bfloat16 rows are read in
  // place (bfloat16 widened in registers: a shift).
  constexpr bool convert = std::is_same_v<cache_t, c10::Float8_e4m3fn>;
  using row_t = std::conditional_t<convert, float, cache_t>;
  auto block_rows = [&](const cache_t* cache, int64_t j, int64_t n) -> const row_t* {
    if constexpr (convert) {
      to_float(cache + table[j] * bs * row, tile.data(), n * row);
      return tile.data();
    } else {
      return cache + table[j] * bs * row;
    }
  };
  for (int64_t j = 0; j < nblocks; ++j) {  // pass 1: scores[h][t] = q_h . k_t
    const int64_t n = std::min(bs, L - j * bs);
    for (int64_t a = 1; a <= PREFETCH_BLOCKS; ++a)
      if (j + a < nblocks) {
        prefetch_block(kp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
        prefetch_block(vp + table[j + a] * bs * row, std::min(bs, L - (j + a) * bs) * row);
      }
    const auto* rows = block_rows(kp, j, n);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t0 = 0; t0 < n; t0 += 16)
        score_rows16<row_t, NV, raw>(qf + h * D, q16 + h * D, scale, rows + t0 * row + (h / G) * D, row,
                                     std::min<int64_t>(16, n - t0), scores.data() + h * L + j * bs + t0);
  }
  for (int64_t h = 0; h < H; ++h) inv[h] = softmax_numerators(scores.data() + h * L, L);
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t j = 0; j < nblocks; ++j) {  // pass 2: acc_h = sum_t p[h][t] v_t
    const int64_t n = std::min(bs, L - j * bs);
    const auto* rows = block_rows(vp, j, n);
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t h0 = g * G; h0 < (g + 1) * G; h0 += HB) {
        float* accs[HB];
        const float* ps[HB];
        for (int b = 0; b < HB; ++b) {
          const int64_t h = std::min(h0 + b, (g + 1) * G - 1);
          accs[b] = acc.data() + h * D;
          ps[b] = scores.data() + h * L + j * bs;
        }
        pv_block<row_t, NV, HB>(accs, ps, rows + g * D, row, n);
      }
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t d = 0; d < D; ++d) out[h * D + d] = static_cast<scalar_t>(acc[h * D + d] * inv[h]);
}
#endif

// Every token of the flat batch attends causally: token j (0-based) of request r's q_len new tokens sees the first
// seq_lens[r] - q_len + j + 1 cached tokens. Decodes (q_len 1) and prefill chunks alike; one task per token, and the
// tokens are split between threads by their cost (the number of keys they read), not by their count.
template <typename scalar_t, typename cache_t, int NV>
static void paged_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                       const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                       const torch::Tensor& query_start_loc, double scale, torch::Tensor& out, int64_t skip_q) {
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
  for (int64_t i = 0; i < T; ++i) cost[i + 1] = cost[i] + (len[i] > 0 ? len[i] + 16 : 0);  // + a fixed per-token cost
  const std::vector<int64_t> bounds = split_by_cost(cost);
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  using attend_fn = void (*)(const float*, const scalar_t*, float, const cache_t*, const cache_t*, const int64_t*,
                             int64_t, int64_t, int64_t, int64_t, std::vector<float>&, std::vector<float>&,
                             std::vector<float>&, std::vector<float>&, scalar_t*);
  attend_fn fast = nullptr;  // attend_avx512 for this head count per KV group, where it applies
#if defined(__AVX512F__)
  if constexpr (NV > 0 && (std::is_same_v<cache_t, float> || std::is_same_v<cache_t, c10::BFloat16> ||
                           std::is_same_v<cache_t, c10::Float8_e4m3fn>)) {
    switch (std::min<int64_t>(H / Hkv, NV <= 4 ? 4 : 2)) {
      case 1: fast = attend_avx512<scalar_t, cache_t, NV, 1>; break;
      case 2: fast = attend_avx512<scalar_t, cache_t, NV, 2>; break;
      case 3: fast = attend_avx512<scalar_t, cache_t, NV, 3>; break;
      default: fast = attend_avx512<scalar_t, cache_t, NV, 4>; break;
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
          for (int64_t a = 0; a < std::min(PREFETCH_BLOCKS, (len[i + 1] + bs - 1) / bs); ++a) {
            prefetch_block(kp + next[a] * bs * Hkv * D, bs * Hkv * D);
            prefetch_block(vp + next[a] * bs * Hkv * D, bs * Hkv * D);
          }
        }
        to_float(qp + i * H * D, qf.data(), H * D);
        for (int64_t e = 0; e < H * D; ++e) qf[e] *= fscale;
        if (fast != nullptr) {
          fast(qf.data(), qp + i * H * D, fscale, kp, vp, tp + req[i] * max_blocks, len[i], H, Hkv, bs, scores, acc,
               tile, inv, op + i * H * D);
          continue;
        }
        attend<scalar_t, cache_t, NV>(qf.data(), raw_bf16 ? qp + i * H * D : nullptr, fscale, kp, vp,
                                      tp + req[i] * max_blocks, len[i], H, Hkv, D, bs, scores, acc, tile, inv,
                                      op + i * H * D);
      }
  });
}

template <typename scalar_t, typename cache_t>
static void paged_dispatch(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                           const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                           const torch::Tensor& query_start_loc, double scale, torch::Tensor& out,
                           int64_t skip_q = 0) {
  auto run = [&](auto nv) {
    paged_impl<scalar_t, cache_t, decltype(nv)::value>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                                       scale, out, skip_q);
  };
  switch (q.size(2)) {  // head_dim: unrolled for the common sizes
    case 32: return run(std::integral_constant<int, 2>{});
    case 64: return run(std::integral_constant<int, 4>{});
    case 128: return run(std::integral_constant<int, 8>{});
    default: return run(std::integral_constant<int, 0>{});
  }
}

// ---------------------------------------------------------------------------------------------------------------
// A register block of RB query rows against keys held as float K^T [D][ldk] and V [nk][D] (the tiled kernels: the
// embedding path's varlen_attention, and paged prefill in cpu_prefill.cpp): scores as broadcast-FMAs over 16 keys at
// a time, each K^T vector shared by the RB rows, the softmax per row, then P.V as broadcast-FMAs over D, each V row
// shared by the RB rows. qf [RB][D]: the queries, already times the scale. Row r sees keys 0 .. lens[r] - 1
// (lens[r] <= nk; ldk a multiple of KEY_PAD >= nk: K^T columns past nk up to the next multiple of KEY_PAD are read
// but their scores never used).
// of [RB][D] <- the unnormalised outputs, inv[r] <- 1 / row r's softmax sum; sc: RB rows of ldk floats of scratch.
// RB (8 for head_dim <= 32, 4 for 64, 2 for 128) and NV = head_dim / 16 (0: any head_dim, scalar P.V): enough
// independent FMA chains to cover the FMA latency, few enough accumulators to stay in registers.
constexpr int64_t KEY_PAD = 64;  // attend_rows' K^T row length (ldk) is a multiple of this

template <int NV, int RB>
static inline void attend_rows(const float* qf, const float* kt, int64_t ldk, const float* vf, int64_t nk,
                               const int64_t* lens, int64_t D, float* sc, float* of, float* inv) {
  // K^T vectors per step: with AVX-512 (one register per vec16, 32 registers) RB * KB >= 8 independent FMA chains;
  // narrower vec16s are already 2 or 4 chains each, and KB > 1 would spill their 16 registers
#if defined(__AVX512F__)
  constexpr int KB = RB >= 8 ? 1 : 8 / RB;
#else
  constexpr int KB = 1;
#endif
  const int64_t nkp = (nk + 16 * KB - 1) / (16 * KB) * (16 * KB);
  for (int64_t j = 0; j < nkp; j += 16 * KB) {  // sc[r][j] = q_r . k_j
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
    inv[r] = softmax_numerators(sr, lens[r]);
    for (int64_t j = lens[r]; j < nk; ++j) sr[j] = 0.f;  // causal: later keys get no weight
  }
  if constexpr (NV > 0) {  // of_r = sum_j p_r[j] v_j
    vec16 a[RB][NV] = {};
    for (int64_t j = 0; j < nk; ++j) {
      vec16 vv[NV];
      for (int i = 0; i < NV; ++i) vv[i] = load16(vf + j * D + 16 * i);
      for (int r = 0; r < RB; ++r) {
        const float pr = sc[r * ldk + j];
        for (int i = 0; i < NV; ++i) a[r][i] += pr * vv[i];
      }
    }
    for (int r = 0; r < RB; ++r)
      for (int i = 0; i < NV; ++i) store16(of + r * D + 16 * i, a[r][i]);
  } else {
    std::fill(of, of + RB * D, 0.f);
    for (int64_t j = 0; j < nk; ++j)
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

// y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), computed in float32 per row as transformers' LlamaRMSNorm does
// (the normalised row is rounded to the storage dtype before the weight multiply). One pass instead of ~7 torch ops.
template <typename scalar_t>
static void rms_norm_impl(const torch::Tensor& x, const torch::Tensor& weight, double eps, torch::Tensor& out) {
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* wp = weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(dim), wf(dim);
    to_float(wp, wf.data(), dim);
    for (int64_t r = begin; r < end; ++r) {
      to_float(xp + r * dim, xf.data(), dim);
      float ss = 0.f;
      for (int64_t d = 0; d < dim; ++d) ss += xf[d] * xf[d];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + feps);
      scalar_t* o = op + r * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const float y = static_cast<float>(from_float<scalar_t>(xf[d] * inv));
        o[d] = from_float<scalar_t>(wf[d] * y);
      }
    }
  });
}

// Greedy sampling's argmax over each row of x [R, V] (float32, or bfloat16 logits as the LM head left them: widening
// is exact, so the answer is the same) contiguous -> [R] int64, with torch.argmax's answer: the first maximal value,
// or the first NaN if a row has one. A vectorised max pass, then a scan for the first index holding it (the row is in
// cache by then); rows split between threads. torch's argmax took ~1.7 ms on a decode step's 128 x 49k logits, 8x
// its own amax.
template <typename T>
static void argmax_impl(const T* xp, int64_t R, int64_t V, int64_t* op) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = xp + r * V;
      vec16 m = vec16{} - INFINITY;
      vec16 nan = vec16{};  // lanes where a NaN was seen: nonzero
      int64_t j = 0;
      for (; j + 16 <= V; j += 16) {
        float f[16];
        to_float(row + j, f, 16);
        const vec16 v = load16(f);
        m = vmax16(v, m);
        nan = nan_lanes16(v, nan);
      }
      float best = -INFINITY;
      bool has_nan = false;
      for (int i = 0; i < 16; ++i) {
        best = std::max(best, m[i]);
        has_nan |= nan[i] != 0.f;
      }
      for (; j < V; ++j) {
        const float x = static_cast<float>(row[j]);
        best = std::max(best, x);
        has_nan |= x != x;
      }
      int64_t idx = 0;
      if (has_nan) {
        while (static_cast<float>(row[idx]) == static_cast<float>(row[idx])) ++idx;
      } else {
        while (static_cast<float>(row[idx]) != best) ++idx;
      }
      op[r] = idx;
    }
  });
}

torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0 &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous, non-empty [R, V] float32 or bfloat16 tensor");
  auto out = torch::empty({x.size(0)}, x.options().dtype(torch::kInt64));
  if (x.scalar_type() == torch::kFloat32)
    argmax_impl(x.data_ptr<float>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  else
    argmax_impl(x.data_ptr<c10::BFloat16>(), x.size(0), x.size(1), out.data_ptr<int64_t>());
  return out;
}

// Rotary embeddings (HF's "rotate half" layout) on q and k in one pass: x [T, heads, D] (rows may be strided, each
// head's D contiguous), cos / sin [T, D] in x's dtype -> a new contiguous [T, heads, D]:
//   out[d] = x[d] * cos[d] + (d < D/2 ? -x[d + D/2] : x[d - D/2]) * sin[d],
// with each product and the sum rounded to x's dtype as torch's ops round them (q * cos, rotate_half(q) * sin, +),
// and no fused multiply-add (fp-contract off), so it equals model/layers.py's torch ops bit for bit in every dtype.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename scalar_t>
static void rope_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, torch::Tensor& out) {
  const int64_t T = x.size(0), Hn = x.size(1), D = x.size(2), half = D / 2;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* cp = cos.data_ptr<scalar_t>();
  const scalar_t* sp = sin.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(D), s(D), v(D);
    for (int64_t t = begin; t < end; ++t) {
      to_float(cp + t * D, c.data(), D);
      to_float(sp + t * D, s.data(), D);
      for (int64_t h = 0; h < Hn; ++h) {
        to_float(xp + t * xs0 + h * xs1, v.data(), D);
        scalar_t* o = op + (t * Hn + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          const float rot = d < half ? -v[d + half] : v[d - half];
          const float a = static_cast<float>(from_float<scalar_t>(v[d] * c[d]));
          const float b = static_cast<float>(from_float<scalar_t>(rot * s[d]));
          o[d] = from_float<scalar_t>(a + b);
        }
      }
    }
  });
}
#pragma GCC pop_options

std::vector<torch::Tensor> rope(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
              q.size(2) % 2 == 0, "q [T, H, D] and k [T, Hkv, D] with an even D");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && cos.size(0) == q.size(0) &&
              cos.size(1) == q.size(2) && sin.sizes() == cos.sizes(), "cos and sin: contiguous [T, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && cos.scalar_type() == q.scalar_type() &&
              sin.scalar_type() == q.scalar_type(), "q, k, cos and sin must share a dtype");
  for (const auto& t : {q, k}) TORCH_CHECK(t.stride(2) == 1, "each head's D values must be contiguous");
  auto qo = torch::empty(q.sizes(), q.options());
  auto ko = torch::empty(k.sizes(), k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(), "rope", [&] {
    rope_rows<scalar_t>(q, cos, sin, qo);
    rope_rows<scalar_t>(k, cos, sin, ko);
  });
  return {qo, ko};
}

// x [..., dim] contiguous, weight [dim] of x's dtype. Returns a new tensor shaped like x.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), "weight must be [dim]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x must share a dtype");
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(), "rms_norm",
                                  [&] { rms_norm_impl<scalar_t>(x, weight, eps, out); });
  return out;
}

// The step's new K and V rows into their cache slots: k / v [T, Hkv, D] (rows may be strided, each row contiguous),
// k_cache / v_cache [num_blocks, block_size, Hkv, D] contiguous with the same element size (any dtype: the rows are
// copied as bytes), slots [T] int64 (block * block_size + offset). One memcpy per row: index_copy_ took ~45 us per
// call for a decode step's 128 rows.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.is_contiguous() &&
              slots.scalar_type() == torch::kInt64, "contiguous caches and int64 slots");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.size(0) == slots.size(0), "k and v: [T, Hkv, D], T slots");
  const int64_t T = k.size(0), row = k.size(1) * k.size(2), elem = k.element_size();
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  TORCH_CHECK(k_cache.numel() == num_slots * row && v_cache.sizes() == k_cache.sizes(), "caches must hold rows of Hkv * D");
  TORCH_CHECK(k_cache.element_size() == elem && v_cache.element_size() == elem && v.element_size() == elem,
              "k, v and the caches must share an element size");
  for (const auto& t : {k, v})
    TORCH_CHECK(t.stride(2) == 1 && t.stride(1) == t.size(2), "each row of k and v must be contiguous");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "slot out of range");
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks = k.stride(0) * elem, vs = v.stride(0) * elem, bytes = row * elem;
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + sp[t] * bytes, kp + t * ks, bytes);
      std::memcpy(vc + sp[t] * bytes, vp + t * vs, bytes);
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

// A gated MLP's activation in one pass: gate_up [M, 2I] float32 or bfloat16 contiguous (gate first) -> [M, I]
// silu(gate) * up, with torch's roundings in bfloat16 (F.silu's result rounded, then the product); the sigmoid as in
// silu_mul_quantize_uint8, so a value may differ from torch's in its last bit. Replaces two torch ops and their
// [M, I] temporary (BENCHMARKS.md).
template <typename scalar_t>
static void silu_mul_impl(const scalar_t* gp, scalar_t* op, int64_t M, int64_t I) {
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> g(I), u(I);
    for (int64_t m = begin; m < end; ++m) {
      to_float(gp + m * 2 * I, g.data(), I);
      to_float(gp + m * 2 * I + I, u.data(), I);
      scalar_t* o = op + m * I;
      for (int64_t i = 0; i < I; ++i) {
        const float x = g[i];
        const float e = exp_nonpos(-std::fabs(x));
        const float sig = (x >= 0.f ? 1.f : e) / (1.f + e);
        const float silu = static_cast<float>(from_float<scalar_t>(x * sig));
        o[i] = from_float<scalar_t>(silu * u[i]);
      }
    }
  });
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0 &&
                  (gate_up.scalar_type() == torch::kFloat32 || gate_up.scalar_type() == torch::kBFloat16),
              "gate_up must be a contiguous [M, 2I] float32 or bfloat16 tensor");
  const int64_t M = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({M, I}, gate_up.options());
  if (gate_up.scalar_type() == torch::kFloat32)
    silu_mul_impl(gate_up.data_ptr<float>(), out.data_ptr<float>(), M, I);
  else
    silu_mul_impl(gate_up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), M, I);
  return out;
}

// y = x W^T for a float linear's weight as the layers hold it: prepacked for oneDNN (an opaque mkldnn tensor, through
// the same mkldnn::_linear_pointwise op model/gemm.py calls) or plain (at::linear).
static torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& w) {
  if (!w.is_mkldnn()) return at::linear(x, w);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, c10::IValue(), c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// The experts of a mixture-of-experts layer over its tokens grouped by expert (the fused-MoE shape): xs [T, h] holds
// the (token, expert) pairs' rows sorted by expert, counts[e] of them for expert e (summing to T); w13[e] is expert
// e's gate|up weight [2I, h] and w2[e] its down weight [h, I], float (prepacked or plain), of xs's dtype. Returns ys
// [T, h]: each run's down(silu(gate) * up), one loop in C++ instead of three calls a expert from Python.
torch::Tensor moe_experts(torch::Tensor xs, std::vector<int64_t> counts, std::vector<torch::Tensor> w13,
                          std::vector<torch::Tensor> w2) {
  TORCH_CHECK(xs.dim() == 2 && xs.is_contiguous() &&
                  (xs.scalar_type() == torch::kFloat32 || xs.scalar_type() == torch::kBFloat16),
              "xs must be a contiguous [T, h] float32 or bfloat16 tensor");
  TORCH_CHECK(counts.size() == w13.size() && counts.size() == w2.size(), "one count and two weights per expert");
  auto ys = torch::empty_like(xs);
  int64_t start = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;
    TORCH_CHECK(n > 0 && start + n <= xs.size(0), "counts must be >= 0 and sum to at most T");
    const torch::Tensor gate_up = float_linear(xs.narrow(0, start, n), w13[e]);
    ys.narrow(0, start, n).copy_(float_linear(silu_mul(gate_up.contiguous()), w2[e]));
    start += n;
  }
  return ys;
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
    _Pragma("GCC unroll 8") for (int i = 0; i < MR; ++i) {
      const float z = xlo[i] + 128.f * xs[i];
      __m512 f = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], cj));
      f = _mm512_add_ps(_mm512_mul_ps(f, _mm512_set1_ps(xs[i])), _mm512_mul_ps(_mm512_set1_ps(z), sumj));
      f = _mm512_add_ps(_mm512_mul_ps(f, wj), bj);
      if (res) f = _mm512_add_ps(f, load16_as_float(res + i * N + 16 * j, m));
      store16_masked(out + i * N + 16 * j, f, m);
    }
  }
}

template <typename scalar_t>
static void int8_gemm_impl(const torch::Tensor& a, const torch::Tensor& packed, const torch::Tensor& comp,
                           const torch::Tensor& xs, const torch::Tensor& xlo, const torch::Tensor& ws,
                           const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                           torch::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1), panels = packed.size(0);
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const int8_t* pp = packed.data_ptr<int8_t>();
  const int32_t* cp = comp.data_ptr<int32_t>();
  const float* xsp = xs.data_ptr<float>();
  const float* xlp = xlo.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t blocks = (M + GEMM_MB - 1) / GEMM_MB;
  at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / blocks, mb = t % blocks, n0 = p * GEMM_NR;
      const int64_t ncols = std::min(GEMM_NR, N - n0);
      const int8_t* panel = pp + p * K * GEMM_NR;
      for (int64_t m = mb * GEMM_MB; m < std::min(M, (mb + 1) * GEMM_MB); m += 6) {
        with_tile_rows(M - m, [&](auto mr) {
          int8_tile<scalar_t, decltype(mr)::value>(ap + m * K, K, panel, cp + n0, xsp + m, xlp + m, wsp + n0,
                                                    bp ? bp + n0 : nullptr, rp ? rp + m * N + n0 : nullptr,
                                                    op + m * N + n0, N, ncols);
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

// w [N, K] int8 contiguous, K % 4 == 0 -> {packed [ceil(N / 64), K / 4, 64, 4] int8 (channels past N are zero),
// comp [ceil(N / 64) * 64] int32 = 128 * sum_k w[n, k]}.
std::vector<torch::Tensor> int8_pack_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kInt8, "w must be a contiguous [N, K] "
              "int8 tensor");
  const int64_t N = w.size(0), K = w.size(1), panels = (N + GEMM_NR - 1) / GEMM_NR;
  TORCH_CHECK(K % 4 == 0, "K must be a multiple of 4");
  auto packed = torch::zeros({panels, K / 4, GEMM_NR, 4}, w.options());
  auto comp = torch::zeros({panels * GEMM_NR}, w.options().dtype(torch::kInt32));
  const int8_t* wp = w.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  int32_t* cp = comp.data_ptr<int32_t>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int8_t* dst = pp + (n / GEMM_NR) * K * GEMM_NR + (n % GEMM_NR) * 4;
      int32_t sum = 0;
      for (int64_t k = 0; k < K; ++k) {
        dst[(k / 4) * 4 * GEMM_NR + k % 4] = wp[n * K + k];
        sum += wp[n * K + k];
      }
      cp[n] = 128 * sum;
    }
  });
  return {packed, comp};
}

// a [M, K] uint8 with x_scale / x_min [M] float32 (quantize_rows_uint8), packed / comp from int8_pack_weight,
// w_scale [N] float32, bias [N] and residual [M, N] (optional) of out's dtype, out [M, N] float32 or bfloat16
// contiguous, written in place.
void int8_gemm(torch::Tensor a, torch::Tensor packed, torch::Tensor comp, torch::Tensor x_scale, torch::Tensor x_min,
               torch::Tensor w_scale, std::optional<torch::Tensor> bias, std::optional<torch::Tensor> residual,
               torch::Tensor out) {
  TORCH_CHECK(int8_gemm_ok, "int8_gemm needs AVX512-VNNI (check int8_gemm_available())");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.scalar_type() == torch::kUInt8, "a must be [M, K] uint8");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 4 == a.size(1) && packed.size(2) == GEMM_NR,
              "packed does not match a's K (int8_pack_weight)");
  TORCH_CHECK(out.dim() == 2 && out.is_contiguous() && out.size(0) == a.size(0) &&
              (out.size(1) + GEMM_NR - 1) / GEMM_NR == packed.size(0), "out must be [M, N] for this packed weight");
  TORCH_CHECK(x_scale.scalar_type() == torch::kFloat32 && w_scale.scalar_type() == torch::kFloat32 &&
              x_scale.numel() == a.size(0) && w_scale.numel() == out.size(1), "scales: float32 [M] and [N]");
  TORCH_CHECK(x_min.scalar_type() == torch::kFloat32 && x_min.numel() == a.size(0), "x_min: float32 [M]");
  check_bias_residual(bias, residual, out);
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (out.scalar_type() == torch::kFloat32)
    int8_gemm_impl<float>(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
  else if (out.scalar_type() == torch::kBFloat16)
    int8_gemm_impl<c10::BFloat16>(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
  else
    TORCH_CHECK(false, "out must be float32 or bfloat16");
#endif
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
