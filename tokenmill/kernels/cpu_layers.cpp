// tokenmill's C++ CPU kernels (RMSNorm, RoPE, argmax, the gated MLP's activation and the MoE experts' loop), compiled on first use by tokenmill/kernels/cpu_kernel.py as one module with
// the other cpu_*.cpp files, in the order it lists them (later files use earlier ones): see its docstring.

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

// The sampler's draw for rows without top-k / top-p (model/sampler.py): x [R, V] logits (float32, or bfloat16 as the
// head left them) contiguous, temperature [R] float32 (> 0), u [R] float64 uniforms in [0, 1) -> [R] int64: per row
// the first token j whose cumulative mass exceeds u times the row's total mass, the masses being
// exp(x / T - max(x / T)): an inverse-CDF draw from softmax(x / T), as the torch path (torch_sample_plain) draws it,
// up to the summation order. A token of zero mass (a logit of -inf: a grammar's mask) is never drawn. Each row is
// widened and scaled once into a float buffer (196 KB for a 49k vocabulary: it stays in L2), its masses summed per
// chunk of 256 (float32, vectorised) and the chunk sums in float64; the draw walks the chunk sums, then the chunk's
// masses in float64. torch took ~30 ms for 128 x 49k rows (the float64 cumulative sum alone ~19).
template <typename T>
static void sample_rows_impl(const T* xp, const float* tp, const double* up, int64_t R, int64_t V, int64_t* out) {
  constexpr int64_t C = 256;
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(V);
    std::vector<double> chunk((V + C - 1) / C);
    float* b = buf.data();
    for (int64_t r = begin; r < end; ++r) {
      to_float(xp + r * V, b, V);
      const float t = tp[r];
      for (int64_t j = 0; j < V; ++j) b[j] = b[j] / t;
      const float m = max_of(b, V);
      if (!(m > -INFINITY)) {  // no token with mass (every logit -inf, or NaN): the first token, as argmax would
        out[r] = 0;
        continue;
      }
      double total = 0.0;
      for (int64_t c = 0; c * C < V; ++c) {
        const int64_t j1 = std::min(V, (c + 1) * C);
        float sum = 0.f;
        for (int64_t j = c * C; j < j1; ++j) {
          const float e = b[j] == -INFINITY ? 0.f : exp_nonpos(b[j] - m);
          b[j] = e;
          sum += e;
        }
        chunk[c] = sum;
        total += sum;
      }
      // strictly below the total, so that some token's mass takes the walk past it
      const double target = std::min(up[r] * total, std::nextafter(total, 0.0));
      double cum = 0.0;
      int64_t c = 0;
      const int64_t chunks = static_cast<int64_t>(chunk.size());
      while (c + 1 < chunks && cum + chunk[c] <= target) cum += chunk[c++];
      int64_t pick = -1;
      for (int64_t j = c * C; j < std::min(V, (c + 1) * C); ++j) {
        cum += b[j];
        if (cum > target) {  // b[j] > 0 here: cum was <= target before it
          pick = j;
          break;
        }
      }
      if (pick < 0) {  // the chunk's float sum rounded above its float64 walk: its last token with mass
        for (int64_t j = std::min(V, (c + 1) * C) - 1; j >= 0 && pick < 0; --j)
          if (b[j] > 0.f) pick = j;
      }
      out[r] = pick;
    }
  });
}

torch::Tensor sample_rows(torch::Tensor x, torch::Tensor temperature, torch::Tensor u) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0 &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "x must be a contiguous, non-empty [R, V] float32 or bfloat16 tensor");
  const int64_t R = x.size(0), V = x.size(1);
  TORCH_CHECK(temperature.dim() == 1 && temperature.size(0) == R && temperature.scalar_type() == torch::kFloat32 &&
                  temperature.is_contiguous(), "temperature must be a contiguous [R] float32 tensor");
  TORCH_CHECK(u.dim() == 1 && u.size(0) == R && u.scalar_type() == torch::kFloat64 && u.is_contiguous(),
              "u must be a contiguous [R] float64 tensor");
  const float* tp = temperature.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(tp[r] > 0.f, "temperatures must be > 0");
  auto out = torch::empty({R}, x.options().dtype(torch::kInt64));
  if (x.scalar_type() == torch::kFloat32)
    sample_rows_impl(x.data_ptr<float>(), tp, u.data_ptr<double>(), R, V, out.data_ptr<int64_t>());
  else
    sample_rows_impl(x.data_ptr<c10::BFloat16>(), tp, u.data_ptr<double>(), R, V, out.data_ptr<int64_t>());
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

