// The kernels on AMX tiles (Intel Advanced Matrix Extensions: AMX-BF16, and AMX-INT8 for w8a8), compiled last into
// the module the other cpu_*.cpp files make (kernels/cpu_kernel.py joins the sources): prefill attention, int8 and
// int4 weight-only's GEMMs, and w8a8's int8 GEMM. See the loader's docstring.
//
// ---- Prefill attention ----
//
// The per-token kernel (paged_impl) gives each query token its own pass over the keys it sees: right for decodes,
// but a prompt of L tokens then reads ~L^2/2 key rows per head and multiplies them on the vector units. Here a tile
// of 16 query tokens of one request and one KV group is one task: S = Q K^T and O = P V run as tile products
// (tdpbf16ps: bfloat16 pairs, float32 sums), 16 x 16 x 32 per instruction, and only the softmax runs on the vector
// units. Two passes over the keys (scores for all of them, then P.V), as the per-token kernel does, so no running
// rescale of O.
//
// Layouts (tiles are 16 rows of 64 bytes):
// - Q, per head: 16 token rows of D bfloat16, as D / 32 A tiles (rows past the tile's tokens are zero).
// - K^T, per 16 keys and 32 dims: a B tile of 16 rows (dim pairs) x 16 keys x 2 (the pair): B[p][2 k + b] =
//   K[k][2 p + b], i.e. a 16 x 16 transposition of 32-bit pairs (kt_block).
// - S: 16 rows x L float32 in memory, stored tile by tile; softmax row by row into P (bfloat16, zero past each row's
//   causal length and past L).
// - V, per 32 keys and 16 dims: a B tile of 16 rows (key pairs) x 16 dims x 2: B[p][2 d + b] = V[2 p + b][d], two V
//   rows interleaved (one two-source permute per 32 values).
// - O, per head: D / 16 tiles of 16 x 16 float32, at most 4 live at once (D = 128 takes two sweeps over the keys).
// - D = 256 (Gemma): the 8 Q tiles do not fit beside S and the B tiles, so one Q tile is reloaded (from L1) per 32
//   dims and 32 keys.
//
// Sliding windows and capped scores (Gemma 2 / 3, Mistral): S is computed for every key as above, and each row's
// softmax covers only its window (keys before it get P = 0), its scores scaled and capped first where a cap applies.
//
// Numerics: the scores are exact sums of exact bfloat16 products in float32, like the per-token kernel's vdpbf16ps
// path; P is rounded to bfloat16 before P.V (flash attention's rounding on GPUs), where the per-token kernel keeps
// it in float32: outputs differ from it by bfloat16 rounding (tests/model/test_cpu_kernel.py bounds it).
//
// Float32 queries (a float32 model over an fp8 cache, whose rows are bfloat16 values): each query row and each row of
// P is split into three bfloat16 parts that sum to it exactly (split3_bf16), and each part goes through the same tile
// products, added into the same float32 accumulators: every product is exact, so S and P.V are float32 attention in
// another summation order (tests/model/test_amx.py: within 1e-5 of the vector units' float32 tiles). Three times
// the tile products of bfloat16; 1.7-1.9x the vector-unit tiles' speed on 1-2k-token prompts.
//
// AMX needs the OS's permission for the tile state once per process (arch_prctl ARCH_REQ_XCOMP_PERM), and each
// thread loads the tile configuration before its first tile instruction; amx_available() says whether both hold on
// this machine. Where the compiler target has no AMX (another CPU: -march=native), none of this is compiled and
// amx_available() is false.

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__)
#define TM_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define TM_AMX 0
#endif

#if TM_AMX
static bool amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

static bool amx_ok() {
  static const bool ok = amx_permission();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile 16 rows x 64 bytes; loaded by each thread before its first tile instruction.
static void amx_configure() {
  TileConfig c;
  for (int i = 0; i < 8; ++i) {
    c.colsb[i] = 64;
    c.rows[i] = 16;
  }
  // GCC 12 does not see ldtilecfg's builtin read its operand and moved these stores after it: a barrier
  asm volatile("" ::: "memory");
  _tile_loadconfig(&c);
}

// dst[p * 16 + k] = src[k][p] for 16 rows of 16 32-bit values (rows at src + k * stride, in 32-bit units).
static inline void transpose16x16_32(const uint32_t* const* rows, uint32_t* dst) {
  __m512i r[16], t[16];
  for (int k = 0; k < 16; ++k) r[k] = _mm512_loadu_si512(rows[k]);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4i + m], 128-bit lane j: rows 4i..4i+3 of column 4j + m; two rounds of lane shuffles gather each column
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xDD);
  }
  for (int p = 0; p < 16; ++p) _mm512_storeu_si512(dst + p * 16, r[p]);
}

// A thread's scratch, kept across its tasks. The K^T and V tiles are built incrementally: consecutive tasks of a
// thread are the successive query tiles of one request and KV group, each seeing more keys, so a task builds only
// the keys past those already built (from the 32-key chunk that held the last build's zero padding).
struct AmxScratch {
  std::vector<uint32_t> kt;  // [Lp / 16][D / 32][16 x 16] K^T B tiles
  std::vector<uint16_t> vv;  // [Lp / 32][D / 16][16 x 32] V B tiles
  std::vector<float> s;      // [16][Ls] scores
  std::vector<uint16_t> p;   // [PARTS][16][Ls] probabilities, bfloat16 (float32 queries: three parts, below)
  std::vector<uint16_t> q;   // [PARTS][16][D] one head's queries, bfloat16
  std::vector<float> o;      // [16][D]
  std::vector<uint16_t> zero;  // a zero K/V row
  std::vector<uint16_t> conv;  // [16][D]: rows of a float8 cache converted to bfloat16
  int64_t r = -1, g = -1, built = 0;  // the request and KV group the tiles hold, and how many keys
};

// 2^t for t <= 0, 16 lanes (t below -125 taken as -125, so that no subnormal float is formed): t = n + r with n an
// integer and |r| <= 1/2, 2^n by the exponent (scalef) and 2^r by a relative minimax polynomial: of degree 4 for
// bfloat16 probabilities (error 3.4e-6, against bfloat16's rounding of 4e-3 right after), of degree 6 for float32 ones
// (F32: 1.1e-7, evaluated in float32). The caller folds log2(e) into the scale, so the softmax's exponent is one fma
// from a score.
template <bool F32>
static inline __m512 exp2_nonpos16(__m512 t) {
  static constexpr float C4[] = {0.009584358893334866f, 0.05596013739705086f, 0.24024765193462372f,
                                 0.6931158900260925f, 0.9999991059303284f};  // highest degree first
  static constexpr float C6[] = {0.0001535658084321767f, 0.0013404160272330046f, 0.0096184853464365f,
                                 0.05550317466259003f, 0.24022646248340607f, 0.6931471824645996f, 1.f};
  t = _mm512_max_ps(t, _mm512_set1_ps(-125.f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(t, n);
  const float* c = F32 ? C6 : C4;
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i <= (F32 ? 6 : 4); ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
  return _mm512_scalef_ps(p, n);
}

// The lanes k .. k + 15 that lie in [first, len), as a mask.
static inline __mmask16 lanes_in(int64_t k, int64_t first, int64_t len) {
  const int64_t lo = std::clamp<int64_t>(first - k, 0, 16), hi = std::clamp<int64_t>(len - k, 0, 16);
  return static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
}

// chunk(k, lanes k..k+15 in [first, len), lanes k+16..k+31 in it) for k = 0, 32, .. < Lp: the masks (lanes_in's
// dozen scalar ops a call) only where a chunk straddles first or len, all-ones in between.
template <typename F>
static inline void for_chunks(int64_t first, int64_t len, int64_t Lp, F&& chunk) {
  const int64_t lo = std::min(Lp, (first + 31) / 32 * 32), hi = std::max(lo, len / 32 * 32);
  auto masked = [&](int64_t k) { chunk(k, lanes_in(k, first, len), lanes_in(k + 16, first, len)); };
  for (int64_t k = 0; k < lo; k += 32) masked(k);
  for (int64_t k = lo; k < hi; k += 32) chunk(k, static_cast<__mmask16>(0xFFFF), static_cast<__mmask16>(0xFFFF));
  for (int64_t k = hi; k < Lp; k += 32) masked(k);
}

// Float32 values as the sum of three bfloat16 parts, exactly: hi = x truncated to bfloat16, mid = (x - hi)
// truncated, lo = x - hi - mid (each difference is exact in float32, and 3 x 8 significand bits hold float32's 24).
// A bfloat16 cache row times each part is exact in float32 too, so three tile products give a float32 query's
// scores, and three give P.V for float32 probabilities, with only the float32 sums' order differing from the vector
// units' float32 math (parts so small they would be bfloat16 subnormals, which the tiles read as 0, are below 2^-126
// of their row's largest).
// 32 values (v0: the first 16) split so, each part packed by one conversion and stored by one 64-byte store; the
// parts go to hi, hi + stride, hi + 2 stride.
static inline void split3_32(__m512 v0, __m512 v1, uint16_t* hi, int64_t stride) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 h0 = (__m512)_mm512_and_si512((__m512i)v0, top), h1 = (__m512)_mm512_and_si512((__m512i)v1, top);
  const __m512 r0 = _mm512_sub_ps(v0, h0), r1 = _mm512_sub_ps(v1, h1);
  const __m512 m0 = (__m512)_mm512_and_si512((__m512i)r0, top), m1 = (__m512)_mm512_and_si512((__m512i)r1, top);
  _mm512_storeu_si512(hi, (__m512i)_mm512_cvtne2ps_pbh(h1, h0));
  _mm512_storeu_si512(hi + stride, (__m512i)_mm512_cvtne2ps_pbh(m1, m0));
  _mm512_storeu_si512(hi + 2 * stride, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(r1, m1), _mm512_sub_ps(r0, m0)));
}

// n % 32 == 0.
static inline void split3_bf16(const float* x, uint16_t* hi, int64_t stride, int64_t n) {
  for (int64_t i = 0; i < n; i += 32) split3_32(_mm512_loadu_ps(x + i), _mm512_loadu_ps(x + i + 16), hi + i, stride);
}

// One row of P from its scores sr[0:Lp]: p[k] = exp(scale * (sr[k] - max)) for first <= k < len, 0 elsewhere;
// returns 1 / the sum (of the float32 values). Lp % 32 == 0, first < len <= Lp. softcap > 0: the row's scores in
// [first, len) are first scaled and capped in place (cap_scores), then taken as they are. PARTS = 1: p rounded to
// bfloat16 into pr[0:Lp] (exp2_nonpos16's error far below that rounding). PARTS = 3 (float32 queries): p to float32
// precision (exp2_nonpos16<true>), stored as three bfloat16 parts (split3_32) at pr, pr + stride, pr + 2 stride.
template <int PARTS>
static inline float softmax_row(float* sr, uint16_t* pr, int64_t stride, int64_t first, int64_t len, int64_t Lp,
                                float scale, float softcap) {
  if (softcap > 0.f) {
    for (int64_t k = first; k < len; ++k) sr[k] *= scale;
    cap_scores(sr + first, len - first, softcap);
    scale = 1.f;
  }
  const float m = max_of(sr + first, len - first);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  const float c = scale * 1.44269504088896341f;  // exp(scale (s - max)) = 2^(c s - c max)
  const __m512 cv = _mm512_set1_ps(c), mc = _mm512_set1_ps(-c * m);
  auto p16 = [&](int64_t k, __mmask16 lanes) __attribute__((always_inline)) {  // p[k .. k + 15], 0 off the lanes
    return _mm512_maskz_mov_ps(lanes, exp2_nonpos16<PARTS == 3>(_mm512_fmadd_ps(_mm512_loadu_ps(sr + k), cv, mc)));
  };
  for_chunks(first, len, Lp, [&](int64_t k, __mmask16 m0, __mmask16 m1) __attribute__((always_inline)) {
    const __m512 e0 = p16(k, m0), e1 = p16(k + 16, m1);
    sum0 = _mm512_add_ps(sum0, e0);
    sum1 = _mm512_add_ps(sum1, e1);
    if constexpr (PARTS == 1) _mm512_storeu_si512(pr + k, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    else split3_32(e0, e1, pr + k, stride);
  });
  return 1.f / _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
}

// S = Q K^T for NH heads (1 or 2) whose query tiles do not stay in tiles 0..3 (float32 queries as three bfloat16 parts,
// head_dim > 128, or two heads at head_dim > 64): head j's part k at sc.q + 16 (PARTS j + k) D, its scores to sc.s +
// 16 j Ls, QT = D / 32. Per 32 keys and 32 dims the two K^T B tiles (6, 7), loaded once, take every head's parts, each
// reloaded from L1 (tiles 0 and 1 in turn); accumulators 2, 3 (head 0) and 4, 5 (head 1), 16 keys each.
template <int QT, int PARTS, int NH>
static void amx_scores_reload(AmxScratch& sc, int64_t Lp, int64_t Ls) {
  constexpr int64_t D = 32 * QT;
  float* s0 = sc.s.data();
  for (int64_t c = 0; c < Lp / 16; c += 2) {
    const uint32_t* b0 = sc.kt.data() + c * QT * 256;
    const uint32_t* b1 = b0 + QT * 256;
    _tile_zero(2);
    _tile_zero(3);
    if constexpr (NH == 2) {
      _tile_zero(4);
      _tile_zero(5);
    }
    for (int dc = 0; dc < QT; ++dc) {
      _tile_loadd(6, b0 + dc * 256, 64);
      _tile_loadd(7, b1 + dc * 256, 64);
      for (int part = 0; part < PARTS; ++part) {
        const uint16_t* qa = sc.q.data() + part * 16 * D + 32 * dc;
        if (NH == 2 || (dc * PARTS + part) % 2 == 0) {
          _tile_loadd(0, qa, D * 2);
          _tile_dpbf16ps(2, 0, 6);
          _tile_dpbf16ps(3, 0, 7);
        } else {
          _tile_loadd(1, qa, D * 2);
          _tile_dpbf16ps(2, 1, 6);
          _tile_dpbf16ps(3, 1, 7);
        }
        if constexpr (NH == 2) {
          _tile_loadd(1, qa + PARTS * 16 * D, D * 2);
          _tile_dpbf16ps(4, 1, 6);
          _tile_dpbf16ps(5, 1, 7);
        }
      }
    }
    _tile_stored(2, s0 + c * 16, Ls * 4);
    _tile_stored(3, s0 + c * 16 + 16, Ls * 4);
    if constexpr (NH == 2) {
      _tile_stored(4, s0 + 16 * Ls + c * 16, Ls * 4);
      _tile_stored(5, s0 + 16 * Ls + c * 16 + 16, Ls * 4);
    }
  }
}

// S = Q K^T for one head over Lp keys (Lp % 32 == 0) into sc.s. PARTS = 1 (bfloat16 queries) or 3 (float32 queries
// as three bfloat16 parts, split3_bf16, each part's products added into the same scores). QT = D / 32 query tiles per
// part, held in tiles 0..3; scores in tiles 4 and 5, K^T B tiles in 6 and 7. Where the QT x PARTS query tiles do not
// fit there (D = 256, or float32 queries): amx_scores_reload.
template <int QT, int PARTS>
static void amx_scores(AmxScratch& sc, int64_t Lp, int64_t Ls) {
  constexpr int64_t D = 32 * QT;
  if constexpr (QT > 4 || PARTS > 1) {
    amx_scores_reload<QT, PARTS, 1>(sc, Lp, Ls);
    return;
  }
  _tile_loadd(0, sc.q.data(), D * 2);
  if constexpr (QT > 1) _tile_loadd(1, sc.q.data() + 32, D * 2);
  if constexpr (QT > 2) _tile_loadd(2, sc.q.data() + 64, D * 2);
  if constexpr (QT > 3) _tile_loadd(3, sc.q.data() + 96, D * 2);
  for (int64_t c = 0; c < Lp / 16; c += 2) {  // 32 keys: tiles 4 and 5
    const uint32_t* b0 = sc.kt.data() + c * QT * 256;
    const uint32_t* b1 = b0 + QT * 256;
    _tile_zero(4);
    _tile_zero(5);
    _tile_loadd(6, b0, 64);
    _tile_loadd(7, b1, 64);
    _tile_dpbf16ps(4, 0, 6);
    _tile_dpbf16ps(5, 0, 7);
    if constexpr (QT > 1) {
      _tile_loadd(6, b0 + 256, 64);
      _tile_loadd(7, b1 + 256, 64);
      _tile_dpbf16ps(4, 1, 6);
      _tile_dpbf16ps(5, 1, 7);
    }
    if constexpr (QT > 2) {
      _tile_loadd(6, b0 + 512, 64);
      _tile_loadd(7, b1 + 512, 64);
      _tile_dpbf16ps(4, 2, 6);
      _tile_dpbf16ps(5, 2, 7);
    }
    if constexpr (QT > 3) {
      _tile_loadd(6, b0 + 768, 64);
      _tile_loadd(7, b1 + 768, 64);
      _tile_dpbf16ps(4, 3, 6);
      _tile_dpbf16ps(5, 3, 7);
    }
    _tile_stored(4, sc.s.data() + c * 16, Ls * 4);
    _tile_stored(5, sc.s.data() + c * 16 + 16, Ls * 4);
  }
}

// amx_scores for two heads of bfloat16 queries (QT = D / 32 <= 2): Q of head j at sc.q + 16 j D, its scores to
// sc.s + 16 j Ls. Each K^T B tile, loaded once per 16 keys, feeds both heads' products (per head, one product per B
// tile loaded: the B tiles, 256 KB per 2k keys at D = 64, come from L2, and their loads held the products back).
template <int QT>
static void amx_scores_pair(AmxScratch& sc, int64_t Lp, int64_t Ls) {
  constexpr int64_t D = 32 * QT;
  const uint16_t* q0 = sc.q.data();
  const uint16_t* q1 = q0 + 16 * D;
  float* s0 = sc.s.data();
  float* s1 = s0 + 16 * Ls;
  _tile_loadd(0, q0, D * 2);
  _tile_loadd(1, q1, D * 2);
  if constexpr (QT > 1) {
    _tile_loadd(2, q0 + 32, D * 2);
    _tile_loadd(3, q1 + 32, D * 2);
  }
  for (int64_t c = 0; c < Lp / 16; ++c) {
    const uint32_t* b = sc.kt.data() + c * QT * 256;
    _tile_zero(4);
    _tile_zero(5);
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(4, 0, 6);
    _tile_dpbf16ps(5, 1, 6);
    if constexpr (QT > 1) {
      _tile_loadd(7, b + 256, 64);
      _tile_dpbf16ps(4, 2, 7);
      _tile_dpbf16ps(5, 3, 7);
    }
    _tile_stored(4, s0 + c * 16, Ls * 4);
    _tile_stored(5, s1 + c * 16, Ls * 4);
  }
}

// O[:, 16 * first .. 16 * (first + n)) = P V for n <= 4 dim slices of 16, one head's bfloat16 P (two heads, or three
// parts: amx_pv_two_slices).
template <int N>
static void amx_pv(AmxScratch& sc, int64_t Lp, int64_t Ls, int64_t D, int64_t first) {
  const int64_t slices = D / 16;
  _tile_zero(0);
  if constexpr (N > 1) _tile_zero(1);
  if constexpr (N > 2) _tile_zero(2);
  if constexpr (N > 3) _tile_zero(3);
  for (int64_t c = 0; c < Lp / 32; ++c) {
    _tile_loadd(4, sc.p.data() + c * 32, Ls * 2);
    const uint16_t* b = sc.vv.data() + (c * slices + first) * 512;
    _tile_loadd(6, b, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (N > 1) {
      _tile_loadd(7, b + 512, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if constexpr (N > 2) {
      _tile_loadd(6, b + 1024, 64);
      _tile_dpbf16ps(2, 4, 6);
    }
    if constexpr (N > 3) {
      _tile_loadd(7, b + 1536, 64);
      _tile_dpbf16ps(3, 4, 7);
    }
  }
  float* o = sc.o.data() + first * 16;
  _tile_stored(0, o, D * 4);
  if constexpr (N > 1) _tile_stored(1, o + 16, D * 4);
  if constexpr (N > 2) _tile_stored(2, o + 32, D * 4);
  if constexpr (N > 3) _tile_stored(3, o + 48, D * 4);
}

// O[:, 16 * first .. 16 * (first + 2)) = P V for two dim slices, of NH heads at once (head j's part k of P at sc.p +
// 16 (PARTS j + k) Ls: bfloat16 P, PARTS = 1, or float32 P as three bfloat16 parts; its output at sc.o + 16 j D): both
// slices' V tiles (6, 7), loaded once per 32 keys, take every head's P (tiles 4 and 5), accumulators 0, 1 (head 0)
// and 2, 3 (head 1). Two heads a pass load each V tile once where a head at a time loaded it per head.
template <int PARTS, int NH>
static void amx_pv_two_slices(AmxScratch& sc, int64_t Lp, int64_t Ls, int64_t D, int64_t first) {
  const int64_t slices = D / 16, stride = 16 * Ls;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NH == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t c = 0; c < Lp / 32; ++c) {
    const uint16_t* pp = sc.p.data() + c * 32;
    const uint16_t* b = sc.vv.data() + (c * slices + first) * 512;
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + 512, 64);
    for (int part = 0; part < PARTS; ++part) {
      _tile_loadd(4, pp + part * stride, Ls * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (NH == 2) {
        _tile_loadd(5, pp + (PARTS + part) * stride, Ls * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
  float* o0 = sc.o.data() + first * 16;
  _tile_stored(0, o0, D * 4);
  _tile_stored(1, o0 + 16, D * 4);
  if constexpr (NH == 2) {
    _tile_stored(2, o0 + 16 * D, D * 4);
    _tile_stored(3, o0 + 16 * D + 16, D * 4);
  }
}

// One task: query tokens i0 .. i0 + n - 1 (n <= 16) of one request, the G heads of KV head g. Token t sees the first
// ctx + t + 1 keys. kp / vp: the caches; table: the request's block table.
// cache_t: bfloat16, or float8 e4m3 (kv_cache_dtype="fp8"), whose rows are converted to bfloat16 (exactly) as the
// tiles are built, once per key per request and KV group while the tasks of one (r, g) follow each other.
// q_t: bfloat16, or float (over a float8 cache: its rows are bfloat16 values): queries and probabilities then go
// through the tiles as three bfloat16 parts each (split3_bf16), the probabilities and the output in float32.
template <typename q_t, typename cache_t>
static void amx_prefill_task(const q_t* qp, const cache_t* kp, const cache_t* vp, const int64_t* table, int64_t r,
                             int64_t i0, int64_t n, int64_t ctx, int64_t g, int64_t H, int64_t Hkv, int64_t D,
                             int64_t bs, float scale, int64_t window, float softcap, q_t* op, AmxScratch& sc) {
  constexpr int PARTS = std::is_same_v<q_t, float> ? 3 : 1;
  const int64_t G = H / Hkv, row = Hkv * D;
  const int64_t L = ctx + n, Lp = (L + 31) / 32 * 32;
  // rows of S and P: Lp plus a cache line, so that the 16 rows of a tile do not share L1 sets (a stride of a multiple
  // of 4 KiB puts them all in one set)
  const int64_t Ls = Lp + 16;
  if (static_cast<int64_t>(sc.s.size()) < 2 * 16 * Ls) sc.s.resize(2 * 16 * Ls);  // two heads' (amx_scores_pair)
  constexpr int PBLOCKS = 2 * PARTS;  // P's blocks of 16 rows: two heads' (amx_pv_two_slices), or their three parts
  if (static_cast<int64_t>(sc.p.size()) < PBLOCKS * 16 * Ls) sc.p.resize(PBLOCKS * 16 * Ls);
  if (static_cast<int64_t>(sc.vv.size()) < Lp * D) {  // resize keeps the tiles built so far
    sc.kt.resize(Lp * D / 2);
    sc.vv.resize(Lp * D);
  }
  sc.q.assign(2 * PARTS * 16 * D, 0);  // two heads' queries (or their three parts each)
  sc.o.resize(2 * 16 * D);
  sc.zero.assign(D, 0);
  sc.conv.resize(16 * D);
  // key's row of cache (zeros past L); a float8 row is converted into conversion slot `slot` (0 .. 15)
  auto key_row = [&](int64_t key, const cache_t* cache, int slot) -> const uint16_t* {
    if (key >= L) return sc.zero.data();
    const cache_t* src = cache + (table[key / bs] * bs + key % bs) * row + g * D;
    if constexpr (std::is_same_v<cache_t, c10::Float8_e4m3fn>) {
      uint16_t* dst = sc.conv.data() + slot * D;
      fp8_to_bf16(src, reinterpret_cast<c10::BFloat16*>(dst), D);
      return dst;
    } else {
      return reinterpret_cast<const uint16_t*>(src);
    }
  };
  const int64_t first = sc.r == r && sc.g == g && sc.built <= L ? sc.built / 32 * 32 : 0;  // first key to build
  // K^T tiles: per 16 keys and 32 dims, a transposition of 32-bit dim pairs
  for (int64_t c = first / 16; c < Lp / 16; ++c) {
    const uint32_t* base[16];
    const uint32_t* rows[16];
    for (int k = 0; k < 16; ++k) base[k] = reinterpret_cast<const uint32_t*>(key_row(c * 16 + k, kp, k));
    for (int64_t dc = 0; dc < D / 32; ++dc) {
      for (int k = 0; k < 16; ++k) rows[k] = base[k] + dc * 16;
      transpose16x16_32(rows, sc.kt.data() + (c * (D / 32) + dc) * 256);
    }
  }
  // V tiles: per 32 keys and 16 dims, rows 2p and 2p + 1 interleaved
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                          37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
  const int64_t slices = D / 16;
  for (int64_t c = first / 32; c < Lp / 32; ++c)
    for (int64_t p = 0; p < 16; ++p) {
      const uint16_t* r0 = key_row(c * 32 + 2 * p, vp, 0);
      const uint16_t* r1 = key_row(c * 32 + 2 * p + 1, vp, 1);
      for (int64_t d = 0; d < D; d += 32) {  // two slices at a time
        const __m512i a = _mm512_loadu_si512(r0 + d), b = _mm512_loadu_si512(r1 + d);
        uint16_t* dst = sc.vv.data() + (c * slices + d / 16) * 512 + p * 32;
        _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo_idx, b));
        _mm512_storeu_si512(dst + 512, _mm512_permutex2var_epi16(a, hi_idx, b));
      }
    }
  sc.r = r;
  sc.g = g;
  sc.built = L;
  float inv[2][16];
  for (int part = 0; part < PBLOCKS; ++part)  // padding rows: P = 0
    for (int64_t t = n; t < 16; ++t) std::memset(sc.p.data() + (part * 16 + t) * Ls, 0, Lp * 2);
  for (int64_t h = g * G; h < (g + 1) * G;) {
    // two heads a pass over K^T and V (amx_scores_pair: bfloat16 queries at head_dim <= 64, their Q tiles held;
    // amx_scores_reload: the rest, their tiles reloaded from L1)
    const int nh = h + 1 < (g + 1) * G ? 2 : 1;
    for (int j = 0; j < nh; ++j)
      for (int64_t t = 0; t < n; ++t) {
        const q_t* src = qp + ((i0 + t) * H + h + j) * D;
        if constexpr (PARTS == 1) std::memcpy(sc.q.data() + (j * 16 + t) * D, src, D * 2);
        else split3_bf16(src, sc.q.data() + (3 * j * 16 + t) * D, 16 * D, D);
      }
    if (nh == 2 && (PARTS == 3 || D > 64)) {
      switch (D / 32) {
        case 1: amx_scores_reload<1, PARTS, 2>(sc, Lp, Ls); break;
        case 2: amx_scores_reload<2, PARTS, 2>(sc, Lp, Ls); break;
        case 4: amx_scores_reload<4, PARTS, 2>(sc, Lp, Ls); break;
        default: amx_scores_reload<8, PARTS, 2>(sc, Lp, Ls); break;
      }
    } else if (nh == 2) {
      if (D == 32) amx_scores_pair<1>(sc, Lp, Ls);
      else amx_scores_pair<2>(sc, Lp, Ls);
    } else {
      switch (D / 32) {
        case 1: amx_scores<1, PARTS>(sc, Lp, Ls); break;
        case 2: amx_scores<2, PARTS>(sc, Lp, Ls); break;
        case 4: amx_scores<4, PARTS>(sc, Lp, Ls); break;
        default: amx_scores<8, PARTS>(sc, Lp, Ls); break;
      }
    }
    for (int j = 0; j < nh; ++j)
      for (int64_t t = 0; t < n; ++t) {  // softmax of each token's visible keys (the first ctx + t + 1, or its window)
        const int64_t len = ctx + t + 1, first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
        float* sr = sc.s.data() + (j * 16 + t) * Ls;
        inv[j][t] = softmax_row<PARTS>(sr, sc.p.data() + (PARTS * j * 16 + t) * Ls, 16 * Ls, first, len, Lp, scale,
                                       softcap);
      }
    if (nh == 2) {
      for (int64_t f = 0; f < slices; f += 2) amx_pv_two_slices<PARTS, 2>(sc, Lp, Ls, D, f);
    } else if (PARTS == 3) {
      for (int64_t f = 0; f < slices; f += 2) amx_pv_two_slices<PARTS, 1>(sc, Lp, Ls, D, f);
    } else {
      for (int64_t f = 0; f < slices; f += 4) {
        switch (std::min<int64_t>(4, slices - f)) {
          case 2: amx_pv<2>(sc, Lp, Ls, D, f); break;
          default: amx_pv<4>(sc, Lp, Ls, D, f); break;
        }
      }
    }
    for (int j = 0; j < nh; ++j, ++h)
      for (int64_t t = 0; t < n; ++t) {
        q_t* dst = op + ((i0 + t) * H + h) * D;
        const float* src = sc.o.data() + (j * 16 + t) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = from_float<q_t>(src[d] * inv[j][t]);
      }
  }
}

// The tokens of requests with at least min_q new tokens, in tiles of 16 (per request and KV head), split between
// threads by cost (keys read); the other tokens are left to the per-token kernel.
template <typename q_t, typename cache_t>
static void amx_prefill(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& block_tables, const torch::Tensor& seq_lens,
                        const torch::Tensor& query_start_loc, double scale, int64_t min_q, torch::Tensor& out,
                        int64_t window = 0, float softcap = 0.f) {
  const int64_t H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
  std::vector<PrefillTile> tasks;
  std::vector<int64_t> cost;
  prefill_tiles(seq_lens, query_start_loc, Hkv, min_q, tasks, cost, window);
  if (tasks.empty()) return;
  const std::vector<int64_t> bounds = split_by_cost(cost);
  const auto* qp = q.data_ptr<q_t>();
  const auto* kp = k_cache.data_ptr<cache_t>();
  const auto* vp = v_cache.data_ptr<cache_t>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  auto* op = out.data_ptr<q_t>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t pbegin, int64_t pend) {
    amx_configure();
    AmxScratch sc;
    for (int64_t part = pbegin; part < pend; ++part)
      for (int64_t i = bounds[part]; i < bounds[part + 1]; ++i) {
        const PrefillTile& t = tasks[i];
        amx_prefill_task<q_t, cache_t>(qp, kp, vp, tp + t.r * max_blocks, t.r, t.i0, t.n, t.ctx, t.g, H, Hkv, D,
                                       bs, fscale, window, softcap, op, sc);
      }
    _tile_release();
  });
}

// ---- int8 weight-only GEMM (int8g_gemm's operands, bfloat16 activations) ----
// A task dequantizes its panel of 32 channels to bfloat16 weights, w = bf16(q * scale + offset) (one rounding per
// weight, as oneDNN's and OpenVINO's weight decompression do, where the AVX-512 path scales each group's exact sum),
// in the panel's own layout [K/2][32][2], which is already two B tiles per 32 along K (channels 0-15 and 16-31: rows
// of 64 bytes, 128 apart); the rows of x are A tiles as they lie. Each block of 16 rows then accumulates over K in
// two tiles, stored once, with the bias and residual added on the way out.
// A panel's weights w = bf16(code * scale + offset) into dst [K/2][32][2] bfloat16. so: the panel's [K/32][2][32]
// float16 scales and offsets; codes(kp, i): the 16 codes (as float) of pair row kp, channels 8i .. 8i + 7, two each
// (k = 2 kp, 2 kp + 1), in that order.
template <typename Codes>
static inline void dequantize_panel_bf16(const uint16_t* so, uint16_t* dst, int64_t K, Codes&& codes) {
  const __m512i lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi = _mm512_add_epi32(lo, _mm512_set1_epi32(8));
  for (int64_t g = 0; g < K / G8_GROUP; ++g) {
    const uint16_t* sg = so + g * 2 * G8_NR;  // 32 scales, then 32 offsets
    const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sg));
    const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sg + 16)));
    const __m512 o0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sg + G8_NR)));
    const __m512 o1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sg + G8_NR + 16)));
    // lanes of 16 codes: channels c..c+7, two codes each: each channel's scale twice
    const __m512 sc[4] = {_mm512_permutexvar_ps(lo, s0), _mm512_permutexvar_ps(hi, s0), _mm512_permutexvar_ps(lo, s1),
                          _mm512_permutexvar_ps(hi, s1)};
    const __m512 of[4] = {_mm512_permutexvar_ps(lo, o0), _mm512_permutexvar_ps(hi, o0), _mm512_permutexvar_ps(lo, o1),
                          _mm512_permutexvar_ps(hi, o1)};
    for (int64_t kp = g * G8_GROUP / 2; kp < (g + 1) * G8_GROUP / 2; ++kp) {
      __m512 w[4];
      for (int i = 0; i < 4; ++i) w[i] = _mm512_fmadd_ps(codes(kp, i), sc[i], of[i]);
      _mm512_storeu_si512(dst + kp * 2 * G8_NR, (__m512i)_mm512_cvtne2ps_pbh(w[1], w[0]));
      _mm512_storeu_si512(dst + kp * 2 * G8_NR + 32, (__m512i)_mm512_cvtne2ps_pbh(w[3], w[2]));
    }
  }
}

// int8g panels: [K/2][32][2] int8 codes.
static void int8g_dequantize_panel_bf16(const uint8_t* panel, const uint16_t* so, uint16_t* dst, int64_t K) {
  const int8_t* codes = reinterpret_cast<const int8_t*>(panel);
  dequantize_panel_bf16(so, dst, K, [&](int64_t kp, int i) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(codes + kp * 2 * G8_NR + 16 * i))));
  });
}

// int4 panels: [K/2][32] bytes, a channel's codes k = 2 kp and 2 kp + 1 in the low and the high nibble of one byte,
// w = (q - 8) * scale + offset.
static void int4g_dequantize_panel_bf16(const uint8_t* panel, const uint16_t* so, uint16_t* dst, int64_t K) {
  const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i shift = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  const __m512i nibble = _mm512_set1_epi32(0xF), eight = _mm512_set1_epi32(8);
  dequantize_panel_bf16(so, dst, K, [&](int64_t kp, int i) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(panel + kp * G8_NR + 8 * i)));
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(dup, bytes), shift), nibble);
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(q, eight));
  });
}

// dequantize: int8g_dequantize_panel_bf16 or int4g_dequantize_panel_bf16; packed: panels of panel_bytes each.
template <typename scalar_t>
static void int8g_amx_impl(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                           const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                           torch::Tensor& out,
                           void (*dequantize)(const uint8_t*, const uint16_t*, uint16_t*, int64_t)) {
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), panels = packed.size(0), G = K / G8_GROUP;
  const int64_t panel_bytes = packed.numel() / panels;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint8_t* pp = static_cast<const uint8_t*>(packed.data_ptr());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const scalar_t* bp = bias ? bias->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual ? residual->data_ptr<scalar_t>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  int8g_for_tasks<uint16_t>(M, panels, K * G8_NR,
    [&](int64_t p, uint16_t* buf) { dequantize(pp + p * panel_bytes, sp + p * G * 2 * G8_NR, buf, K); },
    [&](int64_t p, const uint16_t* buf, int64_t m0, int64_t m1) {
      amx_configure();
      const int64_t n0 = p * G8_NR, ncols = std::min(G8_NR, N - n0);
      alignas(64) float acc[16 * 32];  // [16 rows][32 channels]
      std::vector<uint16_t> pad;  // a last block of fewer than 16 rows, zero-padded
      for (int64_t m = m0; m < m1; m += 16) {
        const int64_t rows = std::min<int64_t>(16, m1 - m);
        const uint16_t* a = xp + m * K;
        if (rows < 16) {
          pad.assign(16 * K, 0);
          std::memcpy(pad.data(), a, rows * K * 2);
          a = pad.data();
        }
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t g = 0; g < G; ++g) {
          _tile_loadd(2, a + g * G8_GROUP, K * 2);
          _tile_loadd(3, buf + g * 16 * 2 * G8_NR, 4 * G8_NR);
          _tile_loadd(4, buf + g * 16 * 2 * G8_NR + 32, 4 * G8_NR);
          _tile_dpbf16ps(0, 2, 3);
          _tile_dpbf16ps(1, 2, 4);
        }
        _tile_stored(0, acc, 128);
        _tile_stored(1, acc + 16, 128);
        for (int64_t j = 0; j < 2; ++j) {
          const int64_t left = ncols - 16 * j;
          if (left <= 0) break;
          const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
          const __m512 bj = bp ? load16_as_float(bp + n0 + 16 * j, mk) : _mm512_setzero_ps();
          for (int64_t i = 0; i < rows; ++i) {
            __m512 f = _mm512_add_ps(_mm512_load_ps(acc + i * 32 + 16 * j), bj);
            if (rp) f = _mm512_add_ps(f, load16_as_float(rp + (m + i) * N + n0 + 16 * j, mk));
            store16_masked(op + (m + i) * N + n0 + 16 * j, f, mk);
          }
        }
      }
    });
}

// ---- w8a8's int8 GEMM on AMX-INT8 tiles (int8_gemm's operands as they are) ----
// int8_pack_weight's panels [N/64][K/4][64][4] are already tdpbusd's B tiles: per 16 channels and 64 along K, 16 rows
// of k-quads x 16 channels x 4 codes (64 bytes), rows 256 bytes apart; the activations' uint8 codes [M, K] are A
// tiles as they lie (16 rows x 64 codes, K bytes apart). tdpbusd multiplies unsigned by signed bytes into int32, as
// VNNI's vpdpbusd does, so the sums are int8_gemm's exactly, and the epilogue is its own (int8_store16): the two
// kernels' results are equal bit for bit. A task is a panel of 64 channels and a block of AMX8_MB rows; per 32 rows
// and 32 channels, 2 x 2 accumulator tiles walk K (each A and B tile used twice); a last block of 16 rows or fewer
// runs 1 x 2. K must be a multiple of 64 (int8_gemm_amx hands other K to int8_gemm).
#if defined(__AMX_INT8__) && defined(__AVX512VNNI__)
#define TM_AMX_INT8 1
constexpr int64_t AMX8_MB = 64;  // rows per task

// ARGMAX: nothing is stored; each row's largest value over the task's channels (the first of equals) goes to
// best_v / best_i [M][panels] instead (int8_gemm_argmax reduces them over the panels); out is unused, N given.
template <typename scalar_t, bool ARGMAX = false>
static void int8_amx_impl(const torch::Tensor& a, const torch::Tensor& packed, const torch::Tensor& comp,
                          const torch::Tensor& xs, const torch::Tensor& xlo, const torch::Tensor& ws,
                          const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& residual,
                          torch::Tensor& out, int64_t N = 0, float* best_v = nullptr, int64_t* best_i = nullptr) {
  const int64_t M = a.size(0), K = a.size(1), panels = packed.size(0);
  if constexpr (!ARGMAX) N = out.size(1);
  const Int8GemmPtrs<scalar_t> P(a, packed, comp, xs, xlo, ws, bias, residual, out);
  const int64_t blocks = (M + AMX8_MB - 1) / AMX8_MB;
  at::parallel_for(0, panels * blocks, 1, [&](int64_t begin, int64_t end) {
    amx_configure();
    alignas(64) int32_t acc[32 * 32];  // [32 rows][32 channels]
    float row_v[32];                   // ARGMAX: each row's best value and channel so far in this panel
    int64_t row_i[32];
    std::vector<uint8_t> pad;          // a last block of rows that fills no whole tile, zero-padded
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / blocks, mb = t % blocks, n0 = p * GEMM_NR, ncols = std::min(GEMM_NR, N - n0);
      const int8_t* panel = P.pp + p * K * GEMM_NR;
      const int64_t m1 = std::min(M, (mb + 1) * AMX8_MB);
      for (int64_t m = mb * AMX8_MB; m < m1; m += 32) {
        const int64_t rows = std::min<int64_t>(32, m1 - m);
        const bool two = rows > 16;  // two row tiles
        const int64_t tile_rows = two ? 32 : 16;
        const uint8_t* x = P.ap + m * K;
        if (rows < tile_rows) {
          pad.assign(tile_rows * K, 0);
          std::memcpy(pad.data(), x, rows * K);
          x = pad.data();
        }
        if constexpr (ARGMAX) std::fill(row_v, row_v + 32, -std::numeric_limits<float>::infinity());
        for (int64_t h = 0; h < 2 && 32 * h < ncols; ++h) {  // channels 32 h .. 32 h + 31
          const int8_t* b = panel + 128 * h;
          _tile_zero(0);
          _tile_zero(1);
          if (two) {
            _tile_zero(2);
            _tile_zero(3);
          }
          for (int64_t k = 0; k < K; k += 64) {
            _tile_loadd(4, x + k, K);
            _tile_loadd(6, b + k * GEMM_NR, 4 * GEMM_NR);
            _tile_loadd(7, b + k * GEMM_NR + 64, 4 * GEMM_NR);
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            if (two) {
              _tile_loadd(5, x + 16 * K + k, K);
              _tile_dpbusd(2, 5, 6);
              _tile_dpbusd(3, 5, 7);
            }
          }
          _tile_stored(0, acc, 128);
          _tile_stored(1, acc + 16, 128);
          if (two) {
            _tile_stored(2, acc + 16 * 32, 128);
            _tile_stored(3, acc + 16 * 32 + 16, 128);
          }
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t c = 32 * h + 16 * j, left = ncols - c;  // the panel's channels c .. c + 15
            if (left <= 0) break;
            const __mmask16 mk = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
            const __m512i cj = _mm512_loadu_si512(P.cp + n0 + c);
            const __m512 sumj = _mm512_cvtepi32_ps(_mm512_srai_epi32(cj, 7));
            const __m512 wj = _mm512_maskz_loadu_ps(mk, P.wsp + n0 + c);
            const __m512 bj = P.bp ? load16_as_float(P.bp + n0 + c, mk) : _mm512_setzero_ps();
            for (int64_t i = 0; i < rows; ++i) {
              const __m512i ai = _mm512_load_si512(acc + i * 32 + 16 * j);
              if constexpr (ARGMAX) {  // channels in increasing order: only a strictly larger value replaces
                const __m512 f = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), mk,
                                                    int8_value16(ai, cj, sumj, wj, bj, P.xsp[m + i], P.xlp[m + i]));
                const float mx = _mm512_reduce_max_ps(f);
                if (mx > row_v[i]) {
                  row_v[i] = mx;
                  row_i[i] = n0 + c + __builtin_ctz(_mm512_cmpeq_ps_mask(f, _mm512_set1_ps(mx)));
                }
              } else {
                int8_store16(ai, cj, sumj, wj, bj, P.xsp[m + i], P.xlp[m + i],
                             P.rp ? P.rp + (m + i) * N + n0 + c : nullptr, P.op + (m + i) * N + n0 + c, mk);
              }
            }
          }
        }
        if constexpr (ARGMAX)
          for (int64_t i = 0; i < rows; ++i) {
            best_v[(m + i) * panels + p] = row_v[i];
            best_i[(m + i) * panels + p] = row_v[i] == -std::numeric_limits<float>::infinity() ? n0 : row_i[i];
          }
      }
    }
    _tile_release();
  });
}
#else
#define TM_AMX_INT8 0
#endif
#endif  // TM_AMX

bool amx_available() {
#if TM_AMX
  return amx_ok();
#else
  return false;
#endif
}

// Whether int8_gemm_amx runs on tiles here: AMX-INT8 in this build and the OS's tile permission (amx_available()).
bool amx_int8_available() {
#if TM_AMX && TM_AMX_INT8
  return amx_ok();
#else
  return false;
#endif
}

// paged_attention with the prefill tokens of requests of at least amx_min_q new tokens (0: none) on AMX tiles, where
// this machine has them (amx_available()), for bfloat16 queries over a bfloat16 or float8 e4m3 cache (its rows
// converted to bfloat16 as the tiles are built, exactly), or float32 queries over a float8 e4m3 cache (queries and
// probabilities as three bfloat16 parts: float32 products, split3_bf16), head_dim 32, 64, 128 or 256; the other
// tokens go through the per-token kernel. window / softcap as for paged_attention_windowed (0: none). Where AMX does
// not apply, paged_attention_windowed with the same arguments (the vector-unit tiles).
torch::Tensor paged_attention_amx(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                  torch::Tensor block_tables, torch::Tensor seq_lens, torch::Tensor query_start_loc,
                                  double scale, int64_t amx_min_q, int64_t window, double softcap) {
  TORCH_CHECK(window >= 0 && softcap >= 0.0, "window and softcap must be >= 0 (0: none)");
#if TM_AMX
  const int64_t D = q.size(2);
  const bool fp8 = k_cache.scalar_type() == at::ScalarType::Float8_e4m3fn;
  const bool bf16q = q.scalar_type() == torch::kBFloat16 && (k_cache.scalar_type() == torch::kBFloat16 || fp8);
  const bool f32q = q.scalar_type() == torch::kFloat && fp8;
  if (amx_min_q > 0 && amx_ok() && (bf16q || f32q) && (D == 32 || D == 64 || D == 128 || D == 256)) {
    check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
    auto out = torch::empty_like(q);
    auto run = [&](auto q_tag, auto cache_tag) {
      using q_t = decltype(q_tag);
      using cache_t = decltype(cache_tag);
      amx_prefill<q_t, cache_t>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, amx_min_q, out,
                                window, static_cast<float>(softcap));
      paged_dispatch<q_t, cache_t>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                                   amx_min_q, window, softcap);
    };
    if (f32q) run(float{}, c10::Float8_e4m3fn{});
    else if (fp8) run(c10::BFloat16{}, c10::Float8_e4m3fn{});
    else run(c10::BFloat16{}, c10::BFloat16{});
    return out;
  }
#endif
  return paged_attention_windowed(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window,
                                  softcap, amx_min_q);
}

// int8g_gemm with bfloat16 x on AMX tiles where this machine has them (amx_available()); int8g_gemm elsewhere. Same
// operands; each weight rounded once to bfloat16 after its scale and offset (int8g_dequantize_panel_bf16).
void int8g_gemm_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, std::optional<torch::Tensor> bias,
                    std::optional<torch::Tensor> residual, torch::Tensor out) {
#if TM_AMX
  if (amx_ok() && x.scalar_type() == torch::kBFloat16) {
    check_int8g_args(x, packed, scales, bias, residual, out);
    if (out.scalar_type() == torch::kFloat32)
      int8g_amx_impl<float>(x, packed, scales, bias, residual, out, int8g_dequantize_panel_bf16);
    else
      int8g_amx_impl<c10::BFloat16>(x, packed, scales, bias, residual, out, int8g_dequantize_panel_bf16);
    return;
  }
#endif
  int8g_gemm(x, packed, scales, bias, residual, out);
}

// int4 weight-only on AMX tiles (this machine must have them: amx_available()): bfloat16 x [M, K]; packed
// [ceil(N / 32), K / 2, 32] uint8, int8g_gemm's panels with two 4-bit codes q per byte (k even in the low nibble);
// scales as int8g_gemm's (float16 scale and offset per 32 weights along K): w = bf16((q - 8) * scale + offset), then
// as int8g_gemm_amx. No other path takes this layout: Int4Weight uses it only where AMX is available.
void int4g_gemm_amx(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, std::optional<torch::Tensor> bias,
                    std::optional<torch::Tensor> residual, torch::Tensor out) {
#if TM_AMX
  TORCH_CHECK(amx_ok(), "int4g_gemm_amx needs AMX (check amx_available())");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "int4g_gemm_amx takes bfloat16 x");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == torch::kUInt8, "packed must be [panels, K / 2, 32] uint8");
  // int8g_gemm's checks on a [panels, K / 2, 32, 1] view: the same panel count and K
  check_int8g_args(x, packed.unsqueeze(3), scales, bias, residual, out);
  if (out.scalar_type() == torch::kFloat32)
    int8g_amx_impl<float>(x, packed, scales, bias, residual, out, int4g_dequantize_panel_bf16);
  else
    int8g_amx_impl<c10::BFloat16>(x, packed, scales, bias, residual, out, int4g_dequantize_panel_bf16);
#else
  TORCH_CHECK(false, "int4g_gemm_amx needs AMX (check amx_available()): this build has none");
#endif
}

// The experts of an int8 / int4 weight-only mixture-of-experts layer in one call (moe_experts' loop for the panel
// GEMMs): xs [T, h] float32 or bfloat16 rows grouped by expert (counts[e] each, summing to at most T); expert e's
// gate|up weight [2I, h] in int8g_gemm's panels (gu_packed[e], gu_scales[e]; int4's two codes a byte for kind 2) and
// its down weight [h, I] likewise (d_*). x_bf16: the GEMMs take bfloat16 input (Int8Weight.x_dtype; always for int4's
// AMX panels), else float32. kind: 0 int8g_gemm, 1 int8g_gemm_amx, 2 int4g_gemm_amx. The rows go to the GEMMs' input
// dtype once for all experts (a per-element conversion: the values each run's own conversion gives), then per expert
// gate|up in xs's dtype, silu_mul, its result converted, and down into the expert's rows of ys: the kernels and
// conversions of Int8Weight / Int4Weight's Python path (Linear, then ops.silu_mul), in its order, equal bit for bit.
// With ``lora`` (moe_experts_panels_lora), each expert's LoRA updates are added to its gate|up and down outputs from
// the layers' inputs in xs's dtype, as its Linears add them.
static torch::Tensor panels_loop(const torch::Tensor& xs, const std::vector<int64_t>& counts,
                                 const std::vector<torch::Tensor>& gu_packed,
                                 const std::vector<torch::Tensor>& gu_scales,
                                 const std::vector<torch::Tensor>& d_packed, const std::vector<torch::Tensor>& d_scales,
                                 bool x_bf16, int64_t kind, const MoeLora* lora) {
  TORCH_CHECK(xs.dim() == 2 && xs.is_contiguous() &&
                  (xs.scalar_type() == torch::kFloat32 || xs.scalar_type() == torch::kBFloat16),
              "xs must be a contiguous [T, h] float32 or bfloat16 tensor");
  const size_t E = counts.size();
  TORCH_CHECK(gu_packed.size() == E && gu_scales.size() == E && d_packed.size() == E && d_scales.size() == E,
              "one count and four weight tensors per expert");
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (int8g_gemm), 1 (int8g_gemm_amx) or 2 (int4g_gemm_amx)");
  TORCH_CHECK(kind != 2 || x_bf16, "int4g_gemm_amx takes bfloat16 input");
  auto gemm = kind == 0 ? int8g_gemm : kind == 1 ? int8g_gemm_amx : int4g_gemm_amx;
  const auto in_dtype = x_bf16 ? torch::kBFloat16 : torch::kFloat32;
  const torch::Tensor xin = xs.to(in_dtype).contiguous();  // [T, h]
  auto ys = torch::empty_like(xs);
  int64_t start = 0;
  for (size_t e = 0; e < E; ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;
    TORCH_CHECK(n > 0 && start + n <= xs.size(0), "counts must be >= 0 and sum to at most T");
    const bool adapted = lora != nullptr && !lora->runs[e].empty();
    const int64_t inter = d_packed[e].size(1) * 2;  // the down weight's K (both layouts hold K / 2 per panel row)
    auto gate_up = torch::empty({n, 2 * inter}, xs.options());
    gemm(xin.narrow(0, start, n), gu_packed[e], gu_scales[e], std::nullopt, std::nullopt, gate_up);
    if (adapted && lora->gu_af[e].numel() > 0)
      lora_rows(xs.narrow(0, start, n), gate_up, lora->gu_af[e], lora->gu_btf[e], lora->runs[e]);
    const torch::Tensor act = silu_mul(gate_up);  // [n, I] in xs's dtype, as ops.silu_mul gives it
    torch::Tensor y = ys.narrow(0, start, n);
    gemm(act.scalar_type() != in_dtype ? act.to(in_dtype).contiguous() : act, d_packed[e], d_scales[e], std::nullopt,
         std::nullopt, y);
    if (adapted && lora->d_af[e].numel() > 0) lora_rows(act, y, lora->d_af[e], lora->d_btf[e], lora->runs[e]);
    start += n;
  }
  return ys;
}

torch::Tensor moe_experts_panels(torch::Tensor xs, std::vector<int64_t> counts, std::vector<torch::Tensor> gu_packed,
                                 std::vector<torch::Tensor> gu_scales, std::vector<torch::Tensor> d_packed,
                                 std::vector<torch::Tensor> d_scales, bool x_bf16, int64_t kind) {
  return panels_loop(xs, counts, gu_packed, gu_scales, d_packed, d_scales, x_bf16, kind, nullptr);
}

// moe_experts_panels for a step with adapter rows (MoeLora's operands, as moe_experts_lora takes them).
torch::Tensor moe_experts_panels_lora(torch::Tensor xs, std::vector<int64_t> counts,
                                      std::vector<torch::Tensor> gu_packed, std::vector<torch::Tensor> gu_scales,
                                      std::vector<torch::Tensor> d_packed, std::vector<torch::Tensor> d_scales,
                                      bool x_bf16, int64_t kind, std::vector<torch::Tensor> gu_af,
                                      std::vector<torch::Tensor> gu_btf, std::vector<torch::Tensor> d_af,
                                      std::vector<torch::Tensor> d_btf, std::vector<std::vector<int64_t>> runs) {
  const MoeLora lora = moe_lora_operands(counts.size(), gu_af, gu_btf, d_af, d_btf, runs);
  return panels_loop(xs, counts, gu_packed, gu_scales, d_packed, d_scales, x_bf16, kind, &lora);
}

// int8_gemm on AMX-INT8 tiles where this machine has them (amx_available() and AMX-INT8 in this build), K is a
// multiple of 64 and there are at least AMX8_MIN_ROWS rows; int8_gemm elsewhere. Same operands, and the same result
// bit for bit (int8_amx_impl). Below 8 rows a tile product is mostly padding and VNNI's register tiles are as fast
// (`python -m benchmarks.gemm_bench --int8`: about equal at 4 rows and 8, AMX 1.6-2.1x from 16).
void int8_gemm_amx(torch::Tensor a, torch::Tensor packed, torch::Tensor comp, torch::Tensor x_scale,
                   torch::Tensor x_min, torch::Tensor w_scale, std::optional<torch::Tensor> bias,
                   std::optional<torch::Tensor> residual, torch::Tensor out) {
#if TM_AMX && TM_AMX_INT8
  constexpr int64_t AMX8_MIN_ROWS = 8;
  if (amx_ok() && a.dim() == 2 && a.size(1) % 64 == 0 && a.size(0) >= AMX8_MIN_ROWS) {
    check_int8_gemm_args(a, packed, x_scale, x_min, w_scale, bias, residual, out);
    if (out.scalar_type() == torch::kFloat32)
      int8_amx_impl<float>(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
    else
      int8_amx_impl<c10::BFloat16>(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
    return;
  }
#endif
  int8_gemm(a, packed, comp, x_scale, x_min, w_scale, bias, residual, out);
}

// The row argmax of int8_gemm's float32 result, without the result: a [M, K] uint8 codes, packed / comp / x_scale /
// x_min / w_scale as int8_gemm's (no bias), N the output's channels -> [M] int64, the first channel of each row's
// largest value, as torch.argmax over int8_gemm's float32 output gives it (the same values: int8_value16). A greedy
// LM head: the logits are never written (128 rows x 49k vocabulary: 25 MB stored and read again a step). AMX-INT8
// only (amx_int8_available()), K a multiple of 64; any number of rows.
torch::Tensor int8_gemm_argmax(torch::Tensor a, torch::Tensor packed, torch::Tensor comp, torch::Tensor x_scale,
                               torch::Tensor x_min, torch::Tensor w_scale, int64_t N) {
#if TM_AMX && TM_AMX_INT8
  TORCH_CHECK(amx_ok(), "int8_gemm_argmax needs AMX (check amx_int8_available())");
  TORCH_CHECK(a.dim() == 2 && a.is_contiguous() && a.scalar_type() == torch::kUInt8 && a.size(1) % 64 == 0,
              "a must be [M, K] uint8 with K a multiple of 64");
  TORCH_CHECK(packed.dim() == 4 && packed.size(1) * 4 == a.size(1) && packed.size(2) == GEMM_NR &&
              (N + GEMM_NR - 1) / GEMM_NR == packed.size(0), "packed does not match a's K and N (int8_pack_weight)");
  TORCH_CHECK(x_scale.scalar_type() == torch::kFloat32 && x_min.scalar_type() == torch::kFloat32 &&
              w_scale.scalar_type() == torch::kFloat32 && x_scale.numel() == a.size(0) &&
              x_min.numel() == a.size(0) && w_scale.numel() == N, "scales: float32 [M], [M] and [N]");
  const int64_t M = a.size(0), panels = packed.size(0);
  std::vector<float> best_v(M * panels);
  std::vector<int64_t> best_i(M * panels);
  torch::Tensor unused;
  int8_amx_impl<float, true>(a, packed, comp, x_scale, x_min, w_scale, std::nullopt, std::nullopt, unused, N,
                             best_v.data(), best_i.data());
  auto ids = torch::empty({M}, torch::kInt64);
  int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {  // panels in increasing order: the first of equal maxima stays
    int64_t best = 0;
    for (int64_t p = 1; p < panels; ++p)
      if (best_v[m * panels + p] > best_v[m * panels + best]) best = p;
    ip[m] = best_i[m * panels + best];
  }
  return ids;
#else
  TORCH_CHECK(false, "int8_gemm_argmax needs AMX-INT8 (check amx_int8_available()): this build has none");
  return {};
#endif
}

// The experts of a w8a8 mixture-of-experts layer in one call (moe_experts' loop, for int8 experts): xs [T, h]
// bfloat16 rows grouped by expert (counts[e] each, summing to at most T); expert e's gate|up weight as
// int8_pack_weight and W8A8Weight hold it (gu_packed[e], gu_comp[e], gu_scale[e]: [2I] channels) and its down weight
// likewise (d_*: [h] channels). The rows' codes are computed once for all experts (quantize_rows_uint8 is per row, so
// a run's codes are the ones quantizing it alone gives), then per expert: gate|up = int8 GEMM, silu_mul_quantize_uint8,
// down = int8 GEMM into its rows of ys. On AMX-INT8 tiles with amx (int8_gemm_amx), VNNI without. The same kernels in
// the same order as W8A8Weight's Python path (forward, then forward_silu_mul): equal to it bit for bit. With lora
// (moe_experts_w8a8_lora), an expert with adapter rows adds its gate|up update before the activation, and where its
// down layer is adapted too, the activation is made on its own (silu_mul, then quantize_rows_uint8: the update reads
// it), as the Linears do when an update needs the activation.
static torch::Tensor w8a8_loop(const torch::Tensor& xs, const std::vector<int64_t>& counts,
                               const std::vector<torch::Tensor>& gu_packed, const std::vector<torch::Tensor>& gu_comp,
                               const std::vector<torch::Tensor>& gu_scale, const std::vector<torch::Tensor>& d_packed,
                               const std::vector<torch::Tensor>& d_comp, const std::vector<torch::Tensor>& d_scale,
                               bool amx, const MoeLora* lora) {
  TORCH_CHECK(xs.dim() == 2 && xs.is_contiguous() && xs.scalar_type() == torch::kBFloat16,
              "xs must be a contiguous [T, h] bfloat16 tensor");
  const size_t E = counts.size();
  TORCH_CHECK(gu_packed.size() == E && gu_comp.size() == E && gu_scale.size() == E && d_packed.size() == E &&
                  d_comp.size() == E && d_scale.size() == E, "one count and six weight tensors per expert");
  auto gemm = amx ? int8_gemm_amx : int8_gemm;
  auto ys = torch::empty_like(xs);
  const std::vector<torch::Tensor> codes = quantize_rows_uint8(xs);  // {u [T, h] uint8, scale [T], min [T]}
  int64_t start = 0;
  for (size_t e = 0; e < E; ++e) {
    const int64_t n = counts[e];
    if (n == 0) continue;
    TORCH_CHECK(n > 0 && start + n <= xs.size(0), "counts must be >= 0 and sum to at most T");
    const bool adapted = lora != nullptr && !lora->runs[e].empty();
    auto gate_up = torch::empty({n, gu_scale[e].size(0)}, xs.options());
    gemm(codes[0].narrow(0, start, n), gu_packed[e], gu_comp[e], codes[1].narrow(0, start, n),
         codes[2].narrow(0, start, n), gu_scale[e], std::nullopt, std::nullopt, gate_up);
    if (adapted && lora->gu_af[e].numel() > 0)
      lora_rows(xs.narrow(0, start, n), gate_up, lora->gu_af[e], lora->gu_btf[e], lora->runs[e]);
    torch::Tensor y = ys.narrow(0, start, n);
    if (adapted && lora->d_af[e].numel() > 0) {
      const torch::Tensor h = silu_mul(gate_up);
      const std::vector<torch::Tensor> act = quantize_rows_uint8(h);
      gemm(act[0], d_packed[e], d_comp[e], act[1], act[2], d_scale[e], std::nullopt, std::nullopt, y);
      lora_rows(h, y, lora->d_af[e], lora->d_btf[e], lora->runs[e]);
    } else {
      const std::vector<torch::Tensor> act = silu_mul_quantize_uint8(gate_up);
      gemm(act[0], d_packed[e], d_comp[e], act[1], act[2], d_scale[e], std::nullopt, std::nullopt, y);
    }
    start += n;
  }
  return ys;
}

torch::Tensor moe_experts_w8a8(torch::Tensor xs, std::vector<int64_t> counts, std::vector<torch::Tensor> gu_packed,
                               std::vector<torch::Tensor> gu_comp, std::vector<torch::Tensor> gu_scale,
                               std::vector<torch::Tensor> d_packed, std::vector<torch::Tensor> d_comp,
                               std::vector<torch::Tensor> d_scale, bool amx) {
  return w8a8_loop(xs, counts, gu_packed, gu_comp, gu_scale, d_packed, d_comp, d_scale, amx, nullptr);
}

// moe_experts_w8a8 for a step with adapter rows (MoeLora's operands, as moe_experts_lora takes them).
torch::Tensor moe_experts_w8a8_lora(torch::Tensor xs, std::vector<int64_t> counts,
                                    std::vector<torch::Tensor> gu_packed, std::vector<torch::Tensor> gu_comp,
                                    std::vector<torch::Tensor> gu_scale, std::vector<torch::Tensor> d_packed,
                                    std::vector<torch::Tensor> d_comp, std::vector<torch::Tensor> d_scale, bool amx,
                                    std::vector<torch::Tensor> gu_af, std::vector<torch::Tensor> gu_btf,
                                    std::vector<torch::Tensor> d_af, std::vector<torch::Tensor> d_btf,
                                    std::vector<std::vector<int64_t>> runs) {
  const MoeLora lora = moe_lora_operands(counts.size(), gu_af, gu_btf, d_af, d_btf, runs);
  return w8a8_loop(xs, counts, gu_packed, gu_comp, gu_scale, d_packed, d_comp, d_scale, amx, &lora);
}
