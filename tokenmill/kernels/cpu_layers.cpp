// tokenmill's C++ CPU kernels (RMSNorm, RoPE, argmax, the gated MLP's activation and the MoE experts' loop), compiled on first use by tokenmill/kernels/cpu_kernel.py as one module with
// the other cpu_*.cpp files, in the order it lists them (later files use earlier ones): see its docstring.

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define TM_BF16_LANES 1
// from_float<c10::BFloat16> on 16 lanes (round to nearest even, NaN to 0x7FC0), the bfloat16 bits in the low half of
// each 32-bit lane; and the rounded value as a float (those bits shifted back up).
static inline __m512i bf16_bits16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  return _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
}
static inline __m512 bf16_round16(__m512 f) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits16(f), 16)); }
static inline __m512 bf16_load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline void bf16_store16(c10::BFloat16* p, __m512 f) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits16(f)));
}
#else
#define TM_BF16_LANES 0
#endif

// y = weight * to_dtype(x * rsqrt(mean(x^2) + eps)), computed in float32 per row as transformers' LlamaRMSNorm does
// (the normalised row is rounded to the storage dtype before the weight multiply). One pass instead of ~7 torch ops.
// bfloat16 rows on AVX-512 in explicit 16-lane code (the compiler's 8-lane loops spent ~2,000 cycles a 576-wide row:
// a bfloat16 long-prompt step's norms cost twice float32's), the same roundings.
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
#if TM_BF16_LANES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (dim % 64 == 0) {
        for (int64_t r = begin; r < end; ++r) {
          const c10::BFloat16* x = xp + r * dim;
          __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
          for (int64_t d = 0; d < dim; d += 64) {
            const __m512 a = bf16_load16(x + d), b = bf16_load16(x + d + 16);
            const __m512 c = bf16_load16(x + d + 32), e = bf16_load16(x + d + 48);
            s0 = _mm512_fmadd_ps(a, a, s0);
            s1 = _mm512_fmadd_ps(b, b, s1);
            s2 = _mm512_fmadd_ps(c, c, s2);
            s3 = _mm512_fmadd_ps(e, e, s3);
          }
          const float ss = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
          const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(ss / static_cast<float>(dim) + feps));
          c10::BFloat16* o = op + r * dim;
          for (int64_t d = 0; d < dim; d += 16) {
            const __m512 y = bf16_round16(_mm512_mul_ps(bf16_load16(x + d), inv));
            bf16_store16(o + d, _mm512_mul_ps(_mm512_loadu_ps(wf.data() + d), y));
          }
        }
        return;
      }
    }
#endif
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

// Prompt logprobs' reduction of the LM head's rows: x [R, V] logits (float32, or bfloat16 as the head left them:
// widening is exact) contiguous, targets [R] int64 -> {logprob [R] float32 (x[target] - logsumexp(x)), rank [R] int64
// (1 + the number of logits above the target's: 1 = the most likely), logsumexp [R] float32}. Each row is widened
// once into a float buffer (196 KB for a 49k vocabulary: it stays in L2), then a max-and-count pass and an exp-sum
// pass, both vectorised; rows split between threads. torch took ~90 ms for 256 x 49k rows (log_softmax, then a
// comparison tensor and its sum) where the bfloat16 head GEMM itself takes ~20.
template <typename T>
static void logprob_rows_impl(const T* xp, const int64_t* tp, int64_t R, int64_t V, float* lp, int64_t* rank,
                              float* lse) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(V);
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      to_float(xp + r * V, b, V);
      const float t = b[tp[r]];
      float m = -INFINITY;
      int64_t above = 0;
      for (int64_t j = 0; j < V; ++j) {
        m = std::max(m, b[j]);
        above += b[j] > t;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < V; ++j) sum += exp_nonpos(b[j] - m);
      const float l = m + std::log(sum);
      lp[r] = t - l;
      rank[r] = above + 1;
      lse[r] = l;
    }
  });
}

std::vector<torch::Tensor> logprob_rows(torch::Tensor x, torch::Tensor targets) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0 &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous, non-empty [R, V] float32 or bfloat16 tensor");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == x.size(0) && targets.scalar_type() == torch::kInt64 &&
                  targets.is_contiguous(), "targets must be a contiguous [R] int64 tensor");
  const int64_t R = x.size(0), V = x.size(1);
  const int64_t* tp = targets.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(tp[r] >= 0 && tp[r] < V, "a target id is outside the vocabulary");
  auto lp = torch::empty({R}, x.options().dtype(torch::kFloat32));
  auto lse = torch::empty({R}, x.options().dtype(torch::kFloat32));
  auto rank = torch::empty({R}, x.options().dtype(torch::kInt64));
  if (x.scalar_type() == torch::kFloat32)
    logprob_rows_impl(x.data_ptr<float>(), tp, R, V, lp.data_ptr<float>(), rank.data_ptr<int64_t>(),
                      lse.data_ptr<float>());
  else
    logprob_rows_impl(x.data_ptr<c10::BFloat16>(), tp, R, V, lp.data_ptr<float>(), rank.data_ptr<int64_t>(),
                      lse.data_ptr<float>());
  return {lp, rank, lse};
}

// The sampler's draws (model/sampler.py), per row of x [R, V] logits (float32, or bfloat16 as the head left them):
// the masses e_j = exp(x_j / T - max(x / T)) (0 for a logit of -inf: a grammar's mask, never drawn), then an
// inverse-CDF walk: the first token whose cumulative mass exceeds u times the mass walked over. Each row is widened
// and scaled once into a float buffer (196 KB for a 49k vocabulary: it stays in L2). The same draws as the sampler's
// torch path (torch_sample_plain, _draw_filtered) up to the summation order: a uniform within rounding of a
// boundary between two tokens may take the other one.

// b[0:V] scaled logits -> masses in place; returns the largest scaled logit (-inf: no token has mass) and sets
// chunk[c] to the float32 sum of chunk c's masses (chunks of SAMPLE_CHUNK), total to their float64 sum.
constexpr int64_t SAMPLE_CHUNK = 256;
static inline float sample_masses(float* b, int64_t V, std::vector<double>& chunk, double& total) {
  const float m = max_of(b, V);
  total = 0.0;
  chunk.assign((V + SAMPLE_CHUNK - 1) / SAMPLE_CHUNK, 0.0);
  if (!(m > -INFINITY)) return m;
  for (int64_t c = 0; c * SAMPLE_CHUNK < V; ++c) {
    const int64_t j1 = std::min(V, (c + 1) * SAMPLE_CHUNK);
    float sum = 0.f;
    for (int64_t j = c * SAMPLE_CHUNK; j < j1; ++j) {
      const float e = b[j] == -INFINITY ? 0.f : exp_nonpos(b[j] - m);
      b[j] = e;
      sum += e;
    }
    chunk[c] = sum;
    total += sum;
  }
  return m;
}

// The plain draw over the whole row (masses b, chunk sums as sample_masses left them): the walk over the chunk sums,
// then over the chosen chunk's masses in float64.
static inline int64_t draw_plain_row(const float* b, int64_t V, const std::vector<double>& chunk, double total,
                                     double u) {
  // strictly below the total, so that some token's mass takes the walk past it
  const double target = std::min(u * total, std::nextafter(total, 0.0));
  double cum = 0.0;
  int64_t c = 0;
  const int64_t chunks = static_cast<int64_t>(chunk.size());
  while (c + 1 < chunks && cum + chunk[c] <= target) cum += chunk[c++];
  const int64_t j1 = std::min(V, (c + 1) * SAMPLE_CHUNK);
  for (int64_t j = c * SAMPLE_CHUNK; j < j1; ++j) {
    cum += b[j];
    if (cum > target) return j;  // b[j] > 0 here: cum was <= target before it
  }
  for (int64_t j = j1 - 1; j >= 0; --j)  // the chunk's float sum rounded above its float64 walk
    if (b[j] > 0.f) return j;
  return 0;
}

// x [R, V] -> the row widened and divided by its temperature into b
template <typename T>
static inline void scaled_row(const T* x, float t, float* b, int64_t V) {
  to_float(x, b, V);
  for (int64_t j = 0; j < V; ++j) b[j] = b[j] / t;
}

// Rows without top-k / top-p: temperature [R] float32 (> 0), u [R] float64 uniforms in [0, 1) -> [R] int64, the
// inverse-CDF draw from softmax(x / T) (masses summed per chunk of 256 in float32, the chunk sums in float64). torch
// took ~26 ms for 128 x 49k rows (its float64 cumulative sum alone ~19); this ~2.5.
template <typename T>
static void sample_rows_impl(const T* xp, const float* tp, const double* up, int64_t R, int64_t V, int64_t* out) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(V);
    std::vector<double> chunk;
    double total;
    for (int64_t r = begin; r < end; ++r) {
      scaled_row(xp + r * V, tp[r], buf.data(), V);
      const float m = sample_masses(buf.data(), V, chunk, total);
      out[r] = m > -INFINITY ? draw_plain_row(buf.data(), V, chunk, total, up[r]) : 0;  // no mass: as argmax would
    }
  });
}

// cand (token ids in increasing order, each of mass b[j] > 0) sorted by mass, largest first, ties in increasing id
// order. Short lists (under 512) by std::sort; longer ones (a flat row's nucleus spans most of the vocabulary) by
// three stable counting passes of 11 bits over the masses' bits (positive floats order as their bit patterns;
// complemented, the largest first): a 128 x 49k step with top-p 0.95 on flat rows in ~30 ms, where comparison sorts
// took ~230 (benchmarks/sampler_bench.py).
// Whether token i comes before token j in that order.
static inline bool heavier(const float* b, int32_t i, int32_t j) { return b[i] > b[j] || (b[i] == b[j] && i < j); }

static void sort_by_mass(const float* b, std::vector<int32_t>& cand, std::vector<int32_t>& tmp) {
  if (cand.size() < 512) {
    std::sort(cand.begin(), cand.end(), [&](int32_t i, int32_t j) { return heavier(b, i, j); });
    return;
  }
  auto key = [&](int32_t j) {
    uint32_t u;
    std::memcpy(&u, b + j, sizeof(u));
    return ~u;
  };
  tmp.resize(cand.size());
  std::vector<uint32_t> count(2048);
  for (int shift = 0; shift < 32; shift += 11) {
    std::fill(count.begin(), count.end(), 0u);
    for (int32_t j : cand) ++count[(key(j) >> shift) & 2047];
    uint32_t sum = 0;
    for (uint32_t& c : count) {
      const uint32_t n = c;
      c = sum;
      sum += n;
    }
    for (int32_t j : cand) tmp[count[(key(j) >> shift) & 2047]++] = j;
    cand.swap(tmp);
  }
}

// Rows with top-k and / or top-p (vLLM's order: the k most likely tokens, renormalised, then the smallest prefix of
// them, most likely first, whose mass reaches top_p; the most likely token always stays), drawn by inverse CDF over
// the kept tokens in that order, as the torch path draws over its sorted row. No full sort: the candidates are
// - top-k: the k largest masses, gathered in one pass with a running threshold (the buffer cut back to its k
//   largest by nth_element whenever it holds max(4k, 512));
// - top-p alone: the tokens of mass >= (1 - top_p) * total / V, a superset of the kept ones (the tokens below it
//   hold less than 1 - top_p of the mass together, so the kept prefix ends among the others);
// then sorted (mass descending, index ascending for ties: sort_by_mass). top_k [R] int64 (0: none), top_p [R]
// float32 (1: none).
template <typename T>
static void sample_rows_filtered_impl(const T* xp, const float* tp, const int64_t* kp, const float* pp,
                                      const double* up, int64_t R, int64_t V, int64_t* out) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(V);
    std::vector<double> chunk;
    std::vector<int32_t> cand, tmp;
    double total;
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      scaled_row(xp + r * V, tp[r], b, V);
      const float m = sample_masses(b, V, chunk, total);
      if (!(m > -INFINITY)) {
        out[r] = 0;
        continue;
      }
      const int64_t k = kp[r] > 0 && kp[r] < V ? kp[r] : 0;
      const float p = pp[r];
      if (k == 0 && !(p < 1.f)) {
        out[r] = draw_plain_row(b, V, chunk, total, up[r]);
        continue;
      }
      cand.clear();
      if (k > 0) {
        const size_t cap = static_cast<size_t>(std::max<int64_t>(4 * k, 512));
        float thr = 0.f;  // the k-th largest mass of the buffer's last cut: smaller ones cannot be in the top k
        for (int64_t j0 = 0; j0 < V; j0 += SAMPLE_CHUNK) {
          const int64_t j1 = std::min(V, j0 + SAMPLE_CHUNK);
          if (thr > 0.f && max_of(b + j0, j1 - j0) < thr) continue;  // (most chunks, once the first cut is made)
          for (int64_t j = j0; j < j1; ++j) {
            if (b[j] > 0.f && b[j] >= thr) {
              cand.push_back(static_cast<int32_t>(j));
              if (cand.size() >= cap) {
                std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(),
                                 [&](int32_t i, int32_t j) { return heavier(b, i, j); });
                thr = b[cand[k - 1]];
                cand.resize(k);
              }
            }
          }
        }
        std::sort(cand.begin(), cand.end());  // ids in increasing order again (sort_by_mass's ties)
      } else {
        const float lo = static_cast<float>((1.0 - p) * total / static_cast<double>(V) * 0.999);
        for (int64_t j = 0; j < V; ++j)
          if (b[j] > 0.f && b[j] >= lo) cand.push_back(static_cast<int32_t>(j));
      }
      sort_by_mass(b, cand, tmp);
      if (k > 0 && static_cast<int64_t>(cand.size()) > k) cand.resize(k);
      double ref = total;  // top-p's whole: the row's mass, or the top k's after top-k
      if (k > 0) {
        ref = 0.0;
        for (int32_t j : cand) ref += b[j];
      }
      const double reach = static_cast<double>(p) * ref;
      double kept = 0.0;
      size_t n = 0;
      while (n < cand.size() && (n == 0 || kept < reach)) kept += b[cand[n++]];
      const double target = std::min(up[r] * kept, std::nextafter(kept, 0.0));
      double cum = 0.0;
      int64_t pick = cand[n - 1];
      for (size_t i = 0; i < n; ++i) {
        cum += b[cand[i]];
        if (cum > target) {
          pick = cand[i];
          break;
        }
      }
      out[r] = pick;
    }
  });
}

static void check_sample_args(const torch::Tensor& x, const torch::Tensor& temperature, const torch::Tensor& u) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0 && x.size(1) < (int64_t(1) << 31) &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous, non-empty [R, V] float32 or bfloat16 tensor");
  const int64_t R = x.size(0);
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == R && temperature.scalar_type() == torch::kFloat32 &&
                  temperature.is_contiguous(), "temperature must be a contiguous [R] float32 tensor");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == R && u.scalar_type() == torch::kFloat64 && u.is_contiguous(),
              "u must be a contiguous [R] float64 tensor");
  const float* tp = temperature.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(tp[r] > 0.f, "temperatures must be > 0");
}

torch::Tensor sample_rows(torch::Tensor x, torch::Tensor temperature, torch::Tensor u) {
  check_sample_args(x, temperature, u);
  const int64_t R = x.size(0), V = x.size(1);
  auto out = torch::empty({R}, x.options().dtype(torch::kInt64));
  const float* tp = temperature.data_ptr<float>();
  if (x.scalar_type() == torch::kFloat32)
    sample_rows_impl(x.data_ptr<float>(), tp, u.data_ptr<double>(), R, V, out.data_ptr<int64_t>());
  else
    sample_rows_impl(x.data_ptr<c10::BFloat16>(), tp, u.data_ptr<double>(), R, V, out.data_ptr<int64_t>());
  return out;
}

torch::Tensor sample_rows_filtered(torch::Tensor x, torch::Tensor temperature, torch::Tensor top_k,
                                   torch::Tensor top_p, torch::Tensor u) {
  check_sample_args(x, temperature, u);
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(top_k.dim() == 1 && top_k.size(0) == R && top_k.scalar_type() == torch::kInt64 && top_k.is_contiguous(),
              "top_k must be a contiguous [R] int64 tensor");
  TORCH_CHECK(top_p.dim() == 1 && top_p.size(0) == R && top_p.scalar_type() == torch::kFloat32 && top_p.is_contiguous(),
              "top_p must be a contiguous [R] float32 tensor");
  const float* pp = top_p.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(pp[r] > 0.f, "top_p must be > 0");
  auto out = torch::empty({R}, x.options().dtype(torch::kInt64));
  const float* tp = temperature.data_ptr<float>();
  const int64_t* kp = top_k.data_ptr<int64_t>();
  if (x.scalar_type() == torch::kFloat32)
    sample_rows_filtered_impl(x.data_ptr<float>(), tp, kp, pp, u.data_ptr<double>(), R, V, out.data_ptr<int64_t>());
  else
    sample_rows_filtered_impl(x.data_ptr<c10::BFloat16>(), tp, kp, pp, u.data_ptr<double>(), R, V,
                              out.data_ptr<int64_t>());
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
#if TM_BF16_LANES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // 16 lanes of each half at a time, the same roundings
      if (half % 16 == 0) {
        const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
        for (int64_t t = begin; t < end; ++t) {
          const c10::BFloat16* ct = cp + t * D;
          const c10::BFloat16* st = sp + t * D;
          for (int64_t h = 0; h < Hn; ++h) {
            const c10::BFloat16* v = xp + t * xs0 + h * xs1;
            c10::BFloat16* o = op + (t * Hn + h) * D;
            for (int64_t j = 0; j < half; j += 16) {
              const __m512 lo = bf16_load16(v + j), hi = bf16_load16(v + half + j);
              const __m512 a0 = bf16_round16(_mm512_mul_ps(lo, bf16_load16(ct + j)));
              const __m512 b0 = bf16_round16(_mm512_mul_ps(_mm512_xor_ps(hi, sign), bf16_load16(st + j)));
              bf16_store16(o + j, _mm512_add_ps(a0, b0));
              const __m512 a1 = bf16_round16(_mm512_mul_ps(hi, bf16_load16(ct + half + j)));
              const __m512 b1 = bf16_round16(_mm512_mul_ps(lo, bf16_load16(st + half + j)));
              bf16_store16(o + half + j, _mm512_add_ps(a1, b1));
            }
          }
        }
        return;
      }
    }
#endif
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

// A gated MLP's activation in one pass: gate_up [M, 2I] float32 or bfloat16 contiguous (gate first) -> [M, I]
// silu(gate) * up, with torch's roundings in bfloat16 (F.silu's result rounded, then the product); the sigmoid as in
// silu_mul_quantize_uint8, so a value may differ from torch's in its last bit. Replaces two torch ops and their
// [M, I] temporary (BENCHMARKS.md).
// One value of silu(x) * u with torch's roundings in scalar_t (silu rounded, then the product).
template <typename scalar_t>
static inline scalar_t silu_mul_one(float x, float u) {
  const float e = exp_nonpos(-std::fabs(x));
  const float sig = (x >= 0.f ? 1.f : e) / (1.f + e);
  return from_float<scalar_t>(static_cast<float>(from_float<scalar_t>(x * sig)) * u);
}

// bfloat16 on AVX-512 in explicit 16-lane code (the compiler's loop ran a bfloat16 [2048, 2 x 1536] at 1.7 ms, a
// float32 one at 1.5; now ~1.3, as fast as the memory here), the same roundings, the sigmoid's exp as
// exp_nonpos_lanes.
template <typename scalar_t>
static void silu_mul_impl(const scalar_t* gp, scalar_t* op, int64_t M, int64_t I) {
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
#if TM_BF16_LANES
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      const int64_t I16 = I / 16 * 16;
      const __m512 one = _mm512_set1_ps(1.f);
      for (int64_t m = begin; m < end; ++m) {
        const c10::BFloat16* g = gp + m * 2 * I;
        const c10::BFloat16* u = g + I;
        c10::BFloat16* o = op + m * I;
        for (int64_t i = 0; i < I16; i += 16) {
          const __m512 x = bf16_load16(g + i);
          const __m512 nabs = _mm512_castsi512_ps(
              _mm512_or_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
          const __m512 e = (__m512)exp_nonpos_lanes((vec16)nabs);  // exp(-|x|)
          const __mmask16 pos = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GE_OQ);
          const __m512 sig = _mm512_div_ps(_mm512_mask_mov_ps(e, pos, one), _mm512_add_ps(one, e));
          const __m512 silu = bf16_round16(_mm512_mul_ps(x, sig));
          bf16_store16(o + i, _mm512_mul_ps(silu, bf16_load16(u + i)));
        }
        for (int64_t i = I16; i < I; ++i) o[i] = silu_mul_one<c10::BFloat16>(g[i], u[i]);
      }
      return;
    }
#endif
    std::vector<float> g(I), u(I);
    for (int64_t m = begin; m < end; ++m) {
      to_float(gp + m * 2 * I, g.data(), I);
      to_float(gp + m * 2 * I + I, u.data(), I);
      scalar_t* o = op + m * I;
      for (int64_t i = 0; i < I; ++i) o[i] = silu_mul_one<scalar_t>(g[i], u[i]);
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

// LoRA updates of short runs of rows in one call (model/lora.py: the decode rows of each adapter, where an update
// per run as two small GEMMs costs ~25 us a GEMM in bfloat16, mostly the call): y [n, out] += (x[r] A_s^T) B_s^T
// for each row r of each run (slot s, first, end) in the flat int64 list runs (3 a run). x [n, in] and y in
// float32 or bfloat16 (y rounded once, after the add); af [S, W, in] and btf [S, W, out] the stacked factors in
// float32 or bfloat16 (both alike: the model's dtype, widened exactly as they load: the float32 arithmetic of float32
// copies), B transposed, so both halves run down contiguous rows. A task is up to LORA_RB rows of one run:
// mid[r][w] = x_r . af[s][w] with each A row read once for the block (the rows' sums independent chains), then
// y_r += sum_w mid[r][w] * btf[s][w] with 4 rows x 64 outputs in registers, each B vector feeding the 4 rows.
constexpr int64_t LORA_RB = 8;

// 16 factors from p as floats: float32 as they are, bfloat16 widened (exact).
static inline vec16 load16_factor(const float* p) { return load16(p); }
static inline vec16 load16_factor(const c10::BFloat16* p) {
#if TM_BF16_LANES
  return (vec16)bf16_load16(p);
#else
  float f[16];
  to_float(p, f, 16);
  return load16(f);
#endif
}

template <typename scalar_t, typename factor_t>
static void lora_rows_impl(const scalar_t* x, scalar_t* y, const factor_t* af, const factor_t* btf,
                           const int64_t* runs, int64_t nruns, int64_t in, int64_t out, int64_t W, int64_t S) {
  std::vector<std::array<int64_t, 3>> tasks;  // (slot, first row, end row): blocks of up to LORA_RB rows of one run
  for (int64_t k = 0; k < nruns; ++k) {
    const int64_t s = runs[3 * k];
    TORCH_CHECK(s >= 0 && s < S && runs[3 * k + 1] <= runs[3 * k + 2],
                "a run is (slot, first, end) with 0 <= slot < S and first <= end");
    for (int64_t r = runs[3 * k + 1]; r < runs[3 * k + 2]; r += LORA_RB)
      tasks.push_back({s, r, std::min(r + LORA_RB, runs[3 * k + 2])});
  }
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(LORA_RB * in), mid(LORA_RB * W), yf(LORA_RB * out);
    for (int64_t k = begin; k < end; ++k) {
      const auto [s, r0, r1] = tasks[k];
      const int64_t nr = r1 - r0;
      for (int64_t r = 0; r < nr; ++r) to_float(x + (r0 + r) * in, xf.data() + r * in, in);
      const factor_t* a = af + s * W * in;
      const int64_t in16 = in / 16 * 16;
      for (int64_t w = 0; w < W; ++w) {  // the block's rows' dot products with A row w as independent chains
        const factor_t* aw = a + w * in;
        vec16 acc[LORA_RB] = {};
        for (int64_t i = 0; i < in16; i += 16) {
          const vec16 av = load16_factor(aw + i);
          for (int64_t r = 0; r < LORA_RB; ++r) acc[r] += load16(xf.data() + std::min(r, nr - 1) * in + i) * av;
        }
        for (int64_t r = 0; r < nr; ++r) {
          float sum = hsum16(acc[r]);
          for (int64_t i = in16; i < in; ++i) sum += xf[r * in + i] * static_cast<float>(aw[i]);
          mid[r * W + w] = sum;
        }
      }
      const factor_t* bt = btf + s * W * out;
      for (int64_t r = 0; r < nr; ++r) to_float(y + (r0 + r) * out, yf.data() + r * out, out);
      const int64_t out64 = out / 64 * 64;
      for (int64_t o = 0; o < out64; o += 64)  // 4 rows x 64 outputs in registers, each B vector feeds 4 rows
        for (int64_t rb = 0; rb < nr; rb += 4) {
          vec16 acc[4][4];
          for (int64_t r = 0; r < 4; ++r)
            for (int j = 0; j < 4; ++j) acc[r][j] = load16(yf.data() + std::min(rb + r, nr - 1) * out + o + 16 * j);
          for (int64_t w = 0; w < W; ++w) {
            vec16 b[4];
            for (int j = 0; j < 4; ++j) b[j] = load16_factor(bt + w * out + o + 16 * j);
            for (int64_t r = 0; r < 4; ++r) {
              const float m = mid[std::min(rb + r, nr - 1) * W + w];
              for (int j = 0; j < 4; ++j) acc[r][j] += m * b[j];
            }
          }
          for (int64_t r = 0; r < 4 && rb + r < nr; ++r)
            for (int j = 0; j < 4; ++j) store16(yf.data() + (rb + r) * out + o + 16 * j, acc[r][j]);
        }
      for (int64_t r = 0; r < nr; ++r) {
        float* yr = yf.data() + r * out;
        for (int64_t w = 0; w < W; ++w)
          for (int64_t o = out64; o < out; ++o) yr[o] += mid[r * W + w] * static_cast<float>(bt[w * out + o]);
        scalar_t* dst = y + (r0 + r) * out;
        for (int64_t o = 0; o < out; ++o) dst[o] = from_float<scalar_t>(yr[o]);
      }
    }
  });
}

void lora_rows(torch::Tensor x, torch::Tensor y, torch::Tensor af, torch::Tensor btf, std::vector<int64_t> runs) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.is_contiguous() && y.is_contiguous() && x.size(0) == y.size(0) &&
                  x.scalar_type() == y.scalar_type() &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x [n, in] and y [n, out] must be contiguous float32 or bfloat16 tensors of one dtype");
  TORCH_CHECK(af.dim() == 3 && btf.dim() == 3 && af.is_contiguous() && btf.is_contiguous() &&
                  af.scalar_type() == btf.scalar_type() &&
                  (af.scalar_type() == torch::kFloat32 || af.scalar_type() == torch::kBFloat16) &&
                  af.size(0) == btf.size(0) && af.size(1) == btf.size(1) && af.size(2) == x.size(1) &&
                  btf.size(2) == y.size(1),
              "af [S, W, in] and btf [S, W, out] must be contiguous float32 or bfloat16 tensors of one dtype "
              "matching x and y");
  TORCH_CHECK(runs.size() % 3 == 0, "runs: (slot, first, end) triples");
  for (size_t k = 0; k < runs.size(); k += 3)
    TORCH_CHECK(runs[k + 1] >= 0 && runs[k + 2] <= x.size(0), "a run's rows must lie in x");
  const int64_t nruns = static_cast<int64_t>(runs.size()) / 3;
  auto with_factors = [&](auto* xp, auto* yp) {
    if (af.scalar_type() == torch::kFloat32)
      lora_rows_impl(xp, yp, af.data_ptr<float>(), btf.data_ptr<float>(), runs.data(), nruns, x.size(1), y.size(1),
                     af.size(1), af.size(0));
    else
      lora_rows_impl(xp, yp, af.data_ptr<c10::BFloat16>(), btf.data_ptr<c10::BFloat16>(), runs.data(), nruns,
                     x.size(1), y.size(1), af.size(1), af.size(0));
  };
  if (x.scalar_type() == torch::kFloat32)
    with_factors(x.data_ptr<float>(), y.data_ptr<float>());
  else
    with_factors(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
}

torch::Tensor panel_gemm(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                         const c10::optional<torch::Tensor>& residual, bool out_bf16);  // cpu_gemm.cpp

// y = x W^T for a float linear's weight as the layers hold it: in panels ([N / 16, K, 16], float32 or bfloat16: the
// panel GEMM model/gemm.py calls on AVX2-only CPUs, float32 sums, the result in x's dtype, rounded once), prepacked
// for oneDNN (an opaque mkldnn tensor, through the same mkldnn::_linear_pointwise op model/gemm.py calls) or plain
// (at::linear).
static torch::Tensor float_linear(const torch::Tensor& x, const torch::Tensor& w) {
  if (!w.is_mkldnn() && w.dim() == 3)
    return panel_gemm(x.to(torch::kFloat).contiguous(), w, c10::nullopt, c10::nullopt,
                      x.scalar_type() == torch::kBFloat16);
  if (!w.is_mkldnn()) return at::linear(x, w);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack{x, w, c10::IValue(), c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A mixture of experts' LoRA factors for moe_experts' loop: per expert e, gu_af[e] / gu_btf[e] and d_af[e] /
// d_btf[e] its gate|up and down layers' stacked factors (lora_rows' af [S, W, in] and btf [S, W, out]; an empty
// tensor where no adapter adapts that layer) and runs[e] its rows' runs (lora_rows' flat (slot, first, end) triples in
// the expert's own rows; empty: no adapter row).
struct MoeLora {
  const std::vector<torch::Tensor> &gu_af, &gu_btf, &d_af, &d_btf;
  const std::vector<std::vector<int64_t>>& runs;
};

static MoeLora moe_lora_operands(size_t E, const std::vector<torch::Tensor>& gu_af,
                                 const std::vector<torch::Tensor>& gu_btf, const std::vector<torch::Tensor>& d_af,
                                 const std::vector<torch::Tensor>& d_btf,
                                 const std::vector<std::vector<int64_t>>& runs) {
  TORCH_CHECK(gu_af.size() == E && gu_btf.size() == E && d_af.size() == E && d_btf.size() == E && runs.size() == E,
              "four factor tensors and one run list per expert");
  return MoeLora{gu_af, gu_btf, d_af, d_btf, runs};
}

// The experts of a mixture-of-experts layer over its tokens grouped by expert (the fused-MoE shape): xs [T, h] holds
// the (token, expert) pairs' rows sorted by expert, counts[e] of them for expert e (summing to T); w13[e] is expert
// e's gate|up weight [2I, h] and w2[e] its down weight [h, I], float (in panels, or prepacked or plain in xs's
// dtype). Returns ys
// [T, h]: each run's down(silu(gate) * up), one loop in C++ instead of three calls a expert from Python. With
// ``lora``, each expert's updates are added to its gate|up output before the activation and to its down output, as
// its Linears would add them.
static torch::Tensor moe_loop(const torch::Tensor& xs, const std::vector<int64_t>& counts,
                              const std::vector<torch::Tensor>& w13, const std::vector<torch::Tensor>& w2,
                              const MoeLora* lora) {
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
    const torch::Tensor x = xs.narrow(0, start, n);
    const bool adapted = lora != nullptr && !lora->runs[e].empty();
    torch::Tensor gate_up = float_linear(x, w13[e]).contiguous();
    if (adapted && lora->gu_af[e].numel() > 0) lora_rows(x, gate_up, lora->gu_af[e], lora->gu_btf[e], lora->runs[e]);
    const torch::Tensor h = silu_mul(gate_up);
    torch::Tensor y = float_linear(h, w2[e]);
    if (adapted && lora->d_af[e].numel() > 0) {
      y = y.contiguous();
      lora_rows(h, y, lora->d_af[e], lora->d_btf[e], lora->runs[e]);
    }
    ys.narrow(0, start, n).copy_(y);
    start += n;
  }
  return ys;
}

torch::Tensor moe_experts(torch::Tensor xs, std::vector<int64_t> counts, std::vector<torch::Tensor> w13,
                          std::vector<torch::Tensor> w2) {
  return moe_loop(xs, counts, w13, w2, nullptr);
}

// moe_experts for a step with adapter rows (MoeLora's operands): the experts keep one call a layer instead of one
// Python round a expert (model/moe.py).
torch::Tensor moe_experts_lora(torch::Tensor xs, std::vector<int64_t> counts, std::vector<torch::Tensor> w13,
                               std::vector<torch::Tensor> w2, std::vector<torch::Tensor> gu_af,
                               std::vector<torch::Tensor> gu_btf, std::vector<torch::Tensor> d_af,
                               std::vector<torch::Tensor> d_btf, std::vector<std::vector<int64_t>> runs) {
  const MoeLora lora = moe_lora_operands(counts.size(), gu_af, gu_btf, d_af, d_btf, runs);
  return moe_loop(xs, counts, w13, w2, &lora);
}

