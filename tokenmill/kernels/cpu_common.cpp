// tokenmill's C++ CPU kernels: what the kernel files share (headers, the 16-float vector type, conversions,
// the softmax pieces, dot products). Compiled on first use by tokenmill/kernels/cpu_kernel.py as one module with the
// other cpu_*.cpp files, in the order it lists them (later files use earlier ones): see its docstring.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <array>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__) || defined(__AVX2__)
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
// (The bits go through memcpy, not a uint32_t* view of dst: a float read of dst after the call could otherwise be
// ordered before these writes under strict aliasing, and was: a logit read back as 0.)
static inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
  }
#elif defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(s[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}
// float8 e4m3 (the fp8 KV cache) -> float, exact, and no step ever holds a float subnormal (an earlier form read the
// byte's bits as a float subnormal for the codes with exponent 0, |x| < 2^-6, common in V, and each multiply of one
// was a microcode assist: decode attention over an fp8 cache ran 3.5x slower than over bfloat16).
// Scalar: a normal code (exponent field e >= 1) is the float with the byte's exponent and mantissa bits moved to bits
// 20-26 and 120 added to the exponent (the biases are 127 and 7); a subnormal code is its mantissa times 2^-9.
// AVX-512: 16 codes at a time through half precision: the byte, sign-extended to 16 bits and shifted left by 7, with
// bit 14 cleared, is the half with the same sign, exponent field e (bias 15) and mantissa, so it is the value times
// 2^-8 (subnormal halves included, which the hardware widens exactly); vcvtph2ps and one multiply by 256 finish it.
// Code 0x7f (NaN) reads as 480 either way: the cache never holds it (torch's cast saturates).
static inline float fp8_to_float(uint8_t b) {
  const uint32_t mag = b & 0x7f;
  float f;
  if (mag >= 0x08) {
    const uint32_t bits = (mag << 20) + (120u << 23);
    std::memcpy(&f, &bits, sizeof(f));
  } else {
    f = static_cast<float>(mag) * 0x1p-9f;
  }
  return (b & 0x80) ? -f : f;
}
#if defined(__AVX512F__)
static inline __m512 fp8x16_to_float(const uint8_t* s) {
  const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(w, 7), _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
}
#elif defined(__AVX2__) && defined(__F16C__)
static inline __m256 fp8x8_to_float(const uint8_t* s) {  // the same on 8 lanes (AVX2 and F16C's vcvtph2ps)
  const __m128i w = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
  const __m128i h = _mm_and_si128(_mm_slli_epi16(w, 7), _mm_set1_epi16(static_cast<int16_t>(0xBF80)));
  return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
}
#endif
// float -> float8 e4m3 as torch's cast gives it: round to nearest even, saturating at +-448 (inf included), NaN to
// 0x7f with its sign, the sign kept (-0 too). A magnitude of at least 2^-6 (a normal code) rounds on its float bits:
// mantissa bits 20-22 kept, the 20 below rounded off to even (a carry runs on into the exponent), the exponent rebiased
// (127 -> 7: 120 << 3 off the code); a smaller one is its count of 2^-9 rounded to even (a subnormal code; 8 is the
// smallest normal, code 0x08, so the two ranges meet).
static inline uint8_t float_to_fp8(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return 0x7F | sign;  // NaN
  if (a >= 0x43E00000u) return 0x7E | sign;  // >= 448
  if (a < 0x3C800000u) {                     // < 2^-6
    float mag;
    std::memcpy(&mag, &a, sizeof(mag));
    return static_cast<uint8_t>(std::nearbyint(mag * 512.f)) | sign;
  }
  a += 0x7FFFFu + ((a >> 20) & 1u);
  return static_cast<uint8_t>((a >> 20) - (120u << 3)) | sign;
}
#if defined(__AVX512F__)
static inline __m128i floatx16_to_fp8(__m512 x) {  // float_to_fp8 on 16 lanes
  const __m512i u = _mm512_castps_si512(x), a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(a, _mm512_add_epi32(_mm512_set1_epi32(0x7FFFF), odd)), 20);
  r = _mm512_sub_epi32(r, _mm512_set1_epi32(120 << 3));
  const __m512i sub = _mm512_cvt_roundps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.f)),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_mask_blend_epi32(_mm512_cmplt_epi32_mask(a, _mm512_set1_epi32(0x3C800000)), r, sub);
  r = _mm512_mask_blend_epi32(_mm512_cmpge_epi32_mask(a, _mm512_set1_epi32(0x43E00000)), r, _mm512_set1_epi32(0x7E));
  r = _mm512_mask_blend_epi32(_mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7F800000)), r, _mm512_set1_epi32(0x7F));
  return _mm512_cvtepi32_epi8(_mm512_or_si512(r, sign));
}
#endif
// n float or bfloat16 values -> float8 e4m3 codes (float_to_fp8).
template <typename T>
static inline void to_fp8(const T* src, uint8_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    __m512 x;
    if constexpr (std::is_same_v<T, float>) {
      x = _mm512_loadu_ps(src + i);
    } else {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), floatx16_to_fp8(x));
  }
#endif
  for (; i < n; ++i) dst[i] = float_to_fp8(static_cast<float>(src[i]));
}
static inline void to_float(const c10::Float8_e4m3fn* src, float* dst, int64_t n) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, fp8x16_to_float(s + i));
#elif defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, fp8x8_to_float(s + i));
#endif
  for (; i < n; ++i) dst[i] = fp8_to_float(s[i]);
}
// float8 e4m3 -> bfloat16, exact (the cache rows of a kv_cache_dtype="fp8" cache, converted once per block). With
// AVX512-VBMI, 64 codes at a time by table lookups: the code's 7-bit magnitude indexes two 128-entry byte tables (the
// bfloat16's high and low bytes, vpermi2b), the sign bit is ORed into the high byte, and the bytes are interleaved
// into words (the input pre-permuted so that unpacking within 128-bit lanes leaves the words in order): ~10
// instructions per 64 codes, against ~6 per 16 through half precision.
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
struct Fp8Bf16Tables {
  alignas(64) uint8_t hi[128], lo[128], perm[64];
  Fp8Bf16Tables() {
    for (int m = 0; m < 128; ++m) {
      const float f = fp8_to_float(static_cast<uint8_t>(m));
      uint32_t u;
      std::memcpy(&u, &f, sizeof(u));
      const uint16_t b = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : static_cast<uint16_t>(u >> 16);  // exact
      hi[m] = static_cast<uint8_t>(b >> 8);
      lo[m] = static_cast<uint8_t>(b & 0xFF);
    }
    for (int L = 0; L < 4; ++L)
      for (int j = 0; j < 8; ++j) {
        perm[16 * L + j] = static_cast<uint8_t>(8 * L + j);           // unpacklo: words 0..31
        perm[16 * L + 8 + j] = static_cast<uint8_t>(32 + 8 * L + j);  // unpackhi: words 32..63
      }
  }
};

static inline void fp8_to_bf16(const c10::Float8_e4m3fn* src, c10::BFloat16* dst, int64_t n) {
  static const Fp8Bf16Tables t;
  const __m512i hi0 = _mm512_load_si512(t.hi), hi1 = _mm512_load_si512(t.hi + 64);
  const __m512i lo0 = _mm512_load_si512(t.lo), lo1 = _mm512_load_si512(t.lo + 64);
  const __m512i perm = _mm512_load_si512(t.perm), low7 = _mm512_set1_epi8(0x7F), sign = _mm512_set1_epi8(-128);
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; i += 64) {
    const int64_t left = n - i;
    const __mmask64 m = left >= 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;
    const __m512i v = _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi8(m, s + i));
    const __m512i mag = _mm512_and_si512(v, low7);
    const __m512i h = _mm512_or_si512(_mm512_permutex2var_epi8(hi0, mag, hi1), _mm512_and_si512(v, sign));
    const __m512i l = _mm512_permutex2var_epi8(lo0, mag, lo1);
    const __mmask32 m0 = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    const __mmask32 m1 = left >= 64 ? ~__mmask32(0) : left > 32 ? (__mmask32(1) << (left - 32)) - 1 : 0;
    _mm512_mask_storeu_epi16(d + i, m0, _mm512_unpacklo_epi8(l, h));
    if (m1) _mm512_mask_storeu_epi16(d + i + 32, m1, _mm512_unpackhi_epi8(l, h));
  }
}
#else
// Without VBMI: through half precision, 16 codes at a time (n a multiple of 16; used where AVX512-BF16 is present).
static inline void fp8_to_bf16(const c10::Float8_e4m3fn* src, c10::BFloat16* dst, int64_t n) {
#if defined(__AVX512BF16__)
  const uint8_t* s = reinterpret_cast<const uint8_t*>(src);
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(fp8x16_to_float(s + i)));
#else
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(static_cast<float>(src[i]));
#endif
}
#endif
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

#if defined(__AVX512F__)
// exp_nonpos on 16 lanes, to float32 precision (its reduction and degree-6 polynomial; 2^n by vscalefps), where
// cpu_amx.cpp's exp_nonpos16 is a degree-5 polynomial for probabilities rounded to bfloat16 (the prefill tiles, the
// AMX float32 softmax and the bfloat16 SiLU use it)
static inline vec16 exp_nonpos_lanes(vec16 xv) {
  const __m512 x = _mm512_max_ps((__m512)xv, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return (vec16)_mm512_scalef_ps(p, n);
}
#endif

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
// loop (a chain of dependent maxss) was half of a long prompt's attention time. Four running maxima, so that the
// loop is not one chain of dependent vmaxps (4 cycles each: a 2k-key row of the AMX prefill's scores spent 12% of
// its attention there).
static inline float max_of(const float* s, int64_t n) {
  vec16 m0 = vec16{} - INFINITY, m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    m0 = vmax16(load16(s + j), m0);
    m1 = vmax16(load16(s + j + 16), m1);
    m2 = vmax16(load16(s + j + 32), m2);
    m3 = vmax16(load16(s + j + 48), m3);
  }
  vec16 mv = vmax16(vmax16(m0, m1), vmax16(m2, m3));
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

// Gemma 2's score cap in place: s <- cap * tanh(s / cap), branch-free so it vectorises. tanh(x) for |x| >= 0.3 is
// (1 - e) / (1 + e) with e = exp(-2|x|) (no cancellation there), below it the odd Taylor polynomial to x^9 (error
// < 2e-8 relative), so small scores keep their relative precision.
static inline void cap_scores(float* s, int64_t n, float cap) {
  const float inv_cap = 1.f / cap;
  for (int64_t j = 0; j < n; ++j) {
    const float x = s[j] * inv_cap, a = std::fabs(x), x2 = x * x;
    const float e = exp_nonpos(-2.f * a);
    const float big = (1.f - e) / (1.f + e);
    const float small = a * (1.f + x2 * (-1.f / 3 + x2 * (2.f / 15 + x2 * (-17.f / 315 + x2 * (62.f / 2835)))));
    const float t = a < 0.3f ? small : big;
    s[j] = cap * (x < 0.f ? -t : t);
  }
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

