// Prefill attention over the paged cache in tiles of query tokens, on the vector units (any CPU, any cache dtype),
// compiled after cpu_common/attention/layers/int8.cpp into the same module (kernels/cpu_kernel.py joins the sources).
//
// The per-token kernel (paged_impl) gives each query token its own pass over the keys it sees: right for decodes,
// but a prompt of L tokens then reads ~L^2/2 key rows per head, each score a dot product summed across the lanes.
// Here a tile of 16 query tokens of one request and one KV head is one task: the keys it sees are converted once
// to float K^T [D][ldk] and V [L][D], and the query rows of each head of the group go through attend_rows (scores
// as broadcast-FMAs over 16 keys, each K^T vector shared by a register block of rows; the same register blocking
// for P.V). Tiles are ordered (request, KV head, tokens) and a thread's tiles are contiguous, so a thread keeps its
// K^T / V across a request's successive tiles and converts only the keys past those it already holds. Numerics: the
// per-token kernel's (float32 products and sums, the same exp), in another summation order.
//
// With AVX-512 and head_dim 16 * NV (16, 32, 64, 128, 256) the tile's 16 rows are instead the 16 lanes of a vector
// (attend_lanes16): K is kept as float rows [ldk][D] like V, the queries transposed, and every inner-loop load is a
// vector of Q^T or of the scores or one broadcast float of K / V at a compile-time offset. 1.3x attend_rows' rate on
// a 2k-token float32 prompt (head_dim 64, 2 threads: ~240 against ~180 GFLOP/s, ~70% of the host's float32 GEMM).
//
// The tiles (prefill_tiles) are also the AMX kernel's (cpu_amx.cpp), which takes them for bfloat16 where the CPU has
// AMX-BF16.
//
// Sliding windows and capped scores (Gemma 2 / 3, Mistral; paged_attention_windowed): a row's scores start at its
// first visible key and are capped before its softmax (attend_rows); K^T / V are still built from key 0 (once per
// request and KV head, linear in the length), the scores, the softmax and P.V only over the window.

// 16 query tokens (n <= 16) of request r starting at flat token i0, KV head g; token i0 + t sees the first
// ctx + t + 1 keys.
struct PrefillTile {
  int64_t r, i0, n, ctx, g;
};

// The tiles of the requests with at least min_q new tokens (min_q > 0), in (request, KV head, tokens) order, with
// prefix costs (cost[0] = 0; a tile costs the keys it reads plus a fixed part; window > 0: at most window + 16 keys)
// for split_by_cost.
static void prefill_tiles(const torch::Tensor& seq_lens, const torch::Tensor& query_start_loc, int64_t Hkv,
                          int64_t min_q, std::vector<PrefillTile>& tiles, std::vector<int64_t>& cost,
                          int64_t window = 0) {
  const int64_t R = seq_lens.size(0);
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  const int64_t* qs = query_start_loc.data_ptr<int64_t>();
  cost.assign(1, 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t q_len = qs[r + 1] - qs[r];
    TORCH_CHECK(q_len >= 1 && q_len <= lp[r], "each request needs 1 <= query length <= seq_len");
    if (q_len < min_q) continue;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t i0 = qs[r]; i0 < qs[r + 1]; i0 += 16) {
        const int64_t n = std::min<int64_t>(16, qs[r + 1] - i0);
        const int64_t ctx = lp[r] - q_len + (i0 - qs[r]);
        tiles.push_back({r, i0, n, ctx, g});
        const int64_t keys = window > 0 ? std::min(ctx + n, window + 16) : ctx + n;
        cost.push_back(cost.back() + keys + 64);
      }
  }
}

// A thread's scratch, kept across its tiles: K^T [D][ldk] and V [ldk][D] of keys 0 .. built - 1 of request r's KV
// head g.
struct TiledScratch {
  std::vector<float> kt, vf, sc, qf, of, row;
  int64_t ldk = 0, r = -1, g = -1, built = 0;
};

#if defined(__AVX512F__)
// A tile's 16 query rows of one head as the 16 lanes of a vector (AVX-512, head_dim D = 16 * NV): qt [D][16] the
// queries times the scale, transposed; kf and vf [>= roundup(nk, 16)][D] the keys and values as float rows (rows
// past nk finite: read, never weighted). Row r sees keys firsts[r] (nullptr: 0) .. lens[r] - 1 (lens[r] <= nk).
// Scores st [nk][16] = K Q^T 16 keys a step: each Q^T vector loaded once feeds 16 FMAs whose key values are
// broadcast from the rows of K at fixed offsets; softcap > 0 caps them (cap_scores); the softmax runs down the lanes
// (a row's masked keys -inf, then weight 0); P.V the same way, 16 output columns a pass: ot [D][16] <- the
// unnormalised outputs, inv[r] <- 1 / row r's softmax sum. Every load in the inner loops is a vector of Q^T or st
// or a broadcast of one float of K / V at a compile-time offset: no per-row address registers (attend_rows' rows
// need one each) and every K / V row is read from L2 once per tile and head, then from L1.
template <int NV>
static void attend_lanes16(const float* qt, const float* kf, const float* vf, int64_t nk, const int64_t* lens,
                           const int64_t* firsts, float softcap, float* st, float* ot, float* inv) {
  constexpr int64_t D = 16 * NV;
  int64_t k0 = 0;  // the first key any row sees
  if (firsts != nullptr) {
    k0 = firsts[0];
    for (int r = 1; r < 16; ++r) k0 = std::min(k0, firsts[r]);
    k0 = k0 / 16 * 16;  // so the steps of 16 keys end at roundup(nk, 16)
  }
  for (int64_t j = k0; j < nk; j += 16) {  // st[j + i][r] = k_{j+i} . q_r (keys past nk computed, masked below)
    vec16 a[16] = {};
    const float* kb = kf + j * D;
    for (int64_t d = 0; d < D; ++d) {
      const vec16 qv = load16(qt + d * 16);
      for (int i = 0; i < 16; ++i) a[i] += kb[i * D + d] * qv;
    }
    for (int i = 0; i < 16; ++i) store16(st + (j + i) * 16, a[i]);
  }
  if (softcap > 0.f) cap_scores(st + k0 * 16, (nk - k0) * 16, softcap);
  vec16 lens_v, first_v;
  for (int r = 0; r < 16; ++r) {
    lens_v[r] = static_cast<float>(lens[r]);  // exact: key counts are far below 2^24
    first_v[r] = firsts != nullptr ? static_cast<float>(firsts[r]) : 0.f;
  }
  const vec16 neg_inf = vec16{} - INFINITY;
  vec16 m = neg_inf;
  for (int64_t j = k0; j < nk; ++j) {  // each lane's masked keys to -inf, and its max
    const vec16 jv = vec16{} + static_cast<float>(j);
    const vec16 sv = (jv < lens_v) & (jv >= first_v) ? load16(st + j * 16) : neg_inf;
    store16(st + j * 16, sv);
    m = vmax16(m, sv);
  }
  vec16 sum = {};
  for (int64_t j = k0; j < nk; ++j) {
    const vec16 sv = load16(st + j * 16);
    const vec16 e = sv == neg_inf ? vec16{} : exp_nonpos_lanes(sv - m);
    store16(st + j * 16, e);
    sum += e;
  }
  for (int r = 0; r < 16; ++r) inv[r] = 1.f / sum[r];
  for (int c = 0; c < NV; ++c) {  // ot[16 c + i][r] = sum_j p_r[j] v_j[16 c + i]
    vec16 a[16] = {};
    for (int64_t j = k0; j < nk; ++j) {
      const vec16 pv = load16(st + j * 16);
      const float* vr = vf + j * D + 16 * c;
      for (int i = 0; i < 16; ++i) a[i] += vr[i] * pv;
    }
    for (int i = 0; i < 16; ++i) store16(ot + (16 * c + i) * 16, a[i]);
  }
}
constexpr bool LANES16_OK = true;
#else
constexpr bool LANES16_OK = false;
template <int NV>
static void attend_lanes16(const float*, const float*, const float*, int64_t, const int64_t*, const int64_t*, float,
                           float*, float*, float*) {}
#endif
// Whether the tiles of head_dim 16 * NV (NV 0: another head_dim) take attend_lanes16 (16 query rows at once) or
// attend_rows (RB rows at once).
template <int NV>
constexpr bool tile_lanes = LANES16_OK && NV > 0;

template <typename scalar_t, typename cache_t, int NV, int RB>
static void tiled_prefill_task(const scalar_t* qp, const cache_t* kp, const cache_t* vp, const int64_t* table,
                               const PrefillTile& t, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale,
                               int64_t window, float softcap, scalar_t* op, TiledScratch& s) {
  constexpr bool lanes = tile_lanes<NV>;
  const int64_t G = H / Hkv, row = Hkv * D, L = t.ctx + t.n;
  const int64_t first = s.r == t.r && s.g == t.g && s.built <= L ? s.built : 0;
  for (int64_t key = first; key < L; ++key) {
    const int64_t slot = table[key / bs] * bs + key % bs;
    if constexpr (lanes) {
      to_float(kp + slot * row + t.g * D, s.kt.data() + key * D, D);  // K as rows [ldk][D]
    } else {
      to_float(kp + slot * row + t.g * D, s.row.data(), D);
      for (int64_t d = 0; d < D; ++d) s.kt[d * s.ldk + key] = s.row[d];  // K^T [D][ldk]
    }
    to_float(vp + slot * row + t.g * D, s.vf.data() + key * D, D);
  }
  s.r = t.r;
  s.g = t.g;
  s.built = L;
  float* qf = s.qf.data();
  if constexpr (lanes) {
    for (int64_t h = t.g * G; h < (t.g + 1) * G; ++h) {
      int64_t lens[16], firsts[16];
      for (int64_t r = 0; r < 16; ++r) {  // rows past the tile repeat its last row: computed, never stored
        const int64_t i = std::min<int64_t>(r, t.n - 1);
        to_float(qp + ((t.i0 + i) * H + h) * D, s.row.data(), D);
        for (int64_t d = 0; d < D; ++d) qf[d * 16 + r] = s.row[d] * scale;
        lens[r] = t.ctx + i + 1;
        firsts[r] = window > 0 ? std::max<int64_t>(0, lens[r] - window) : 0;
      }
      float inv[16];
      attend_lanes16<NV>(qf, s.kt.data(), s.vf.data(), L, lens, window > 0 ? firsts : nullptr, softcap, s.sc.data(),
                         s.of.data(), inv);
      for (int64_t r = 0; r < t.n; ++r) {
        scalar_t* o = op + ((t.i0 + r) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<scalar_t>(s.of[d * 16 + r] * inv[r]);
      }
    }
    return;
  }
  for (int64_t h = t.g * G; h < (t.g + 1) * G; ++h)
    for (int64_t a = 0; a < t.n; a += RB) {
      const int64_t nr = std::min<int64_t>(RB, t.n - a);
      int64_t lens[RB], firsts[RB];
      for (int64_t r = 0; r < RB; ++r) {  // rows past the tile repeat its last row: computed, never stored
        const int64_t i = a + std::min<int64_t>(r, nr - 1);
        to_float(qp + ((t.i0 + i) * H + h) * D, qf + r * D, D);
        for (int64_t d = 0; d < D; ++d) qf[r * D + d] *= scale;
        lens[r] = t.ctx + i + 1;
        firsts[r] = window > 0 ? std::max<int64_t>(0, lens[r] - window) : 0;
      }
      float inv[RB];
      attend_rows<NV, RB>(qf, s.kt.data(), s.ldk, s.vf.data(), t.ctx + a + nr, lens, D, s.sc.data(), s.of.data(),
                          inv, window > 0 ? firsts : nullptr, softcap);
      for (int64_t r = 0; r < nr; ++r) {
        scalar_t* o = op + ((t.i0 + a + r) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<scalar_t>(s.of[r * D + d] * inv[r]);
      }
    }
}

template <typename scalar_t, typename cache_t, int NV, int RB>
static void tiled_prefill_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                               const torch::Tensor& block_tables, const std::vector<PrefillTile>& tiles,
                               const std::vector<int64_t>& cost, double scale, int64_t window, float softcap,
                               torch::Tensor& out) {
  const int64_t H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t max_blocks = block_tables.size(1);
  int64_t max_len = 0;
  for (const PrefillTile& t : tiles) max_len = std::max(max_len, t.ctx + t.n);
  const int64_t ldk = (max_len + KEY_PAD - 1) / KEY_PAD * KEY_PAD;
  const std::vector<int64_t> bounds = split_by_cost(cost);
  const auto* qp = q.data_ptr<scalar_t>();
  const auto* kp = static_cast<const cache_t*>(k_cache.data_ptr());
  const auto* vp = static_cast<const cache_t*>(v_cache.data_ptr());
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  auto* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t pbegin, int64_t pend) {
    TiledScratch s;
    s.ldk = ldk;
    s.kt.assign(D * ldk, 0.f);
    s.vf.assign(ldk * D, 0.f);
    constexpr int64_t rows = tile_lanes<NV> ? 16 : RB;  // query rows attended at once
    s.sc.resize(rows * ldk);
    s.qf.resize(rows * D);
    s.of.resize(rows * D);
    s.row.resize(D);
    for (int64_t part = pbegin; part < pend; ++part)
      for (int64_t i = bounds[part]; i < bounds[part + 1]; ++i) {
        const PrefillTile& t = tiles[i];
        tiled_prefill_task<scalar_t, cache_t, NV, RB>(qp, kp, vp, tp + t.r * max_blocks, t, H, Hkv, D, bs, fscale,
                                                      window, softcap, op, s);
      }
  });
}

// The tiles' tokens into out; the other tokens are left (the per-token kernel's, with skip_q = min_q).
template <typename scalar_t, typename cache_t>
static void tiled_prefill(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                          const torch::Tensor& block_tables, const std::vector<PrefillTile>& tiles,
                          const std::vector<int64_t>& cost, double scale, torch::Tensor& out, int64_t window = 0,
                          float softcap = 0.f) {
  if (tiles.empty()) return;
  with_attend_shape(q.size(2), [&](auto nv, auto rb) {
    tiled_prefill_impl<scalar_t, cache_t, decltype(nv)::value, decltype(rb)::value>(q, k_cache, v_cache, block_tables,
                                                                                     tiles, cost, scale, window,
                                                                                     softcap, out);
  });
}

// paged_attention with a sliding window (window > 0: each token sees its last `window` keys; 0: all) and capped
// scores (softcap > 0: softcap * tanh(score / softcap) before the softmax; 0: none), for Gemma 2 / 3 and Mistral's
// layers: the prefill tokens of requests with at least min_q new tokens in tiles (min_q 0: none), the rest per token.
torch::Tensor paged_attention_windowed(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                       torch::Tensor block_tables, torch::Tensor seq_lens,
                                       torch::Tensor query_start_loc, double scale, int64_t window, double softcap,
                                       int64_t min_q) {
  check_paged_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc);
  TORCH_CHECK(window >= 0 && softcap >= 0.0, "window and softcap must be >= 0 (0: none)");
  auto out = torch::empty_like(q);
  std::vector<PrefillTile> tiles;
  std::vector<int64_t> cost;
  if (min_q > 0) prefill_tiles(seq_lens, query_start_loc, k_cache.size(2), min_q, tiles, cost, window);
  with_paged_types(q, k_cache, [&](auto scalar_tag, auto cache_tag) {
    using scalar_t = decltype(scalar_tag);
    using cache_t = decltype(cache_tag);
    tiled_prefill<scalar_t, cache_t>(q, k_cache, v_cache, block_tables, tiles, cost, scale, out, window,
                                     static_cast<float>(softcap));
    paged_dispatch<scalar_t, cache_t>(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out,
                                      std::max<int64_t>(min_q, 0), window, softcap);
  });
  return out;
}

// paged_attention with the prefill tokens of requests of at least min_q new tokens in a step attended in tiles
// (min_q 0: paged_attention): paged_attention_windowed without a window or a cap. Same arguments, dtypes and result
// up to float32 summation order.
torch::Tensor paged_attention_tiled(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                    torch::Tensor block_tables, torch::Tensor seq_lens,
                                    torch::Tensor query_start_loc, double scale, int64_t min_q) {
  return paged_attention_windowed(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, 0, 0.0,
                                  min_q);
}
