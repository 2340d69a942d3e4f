"""A C++ CPU kernel for decode attention over the paged KV cache, compiled on first use.

The torch path gathers every decoding sequence's K and V into padded dense tensors (a copy of the whole context per
layer per step) before attending. This kernel reads each key and value row in place through the block table, one
(sequence, KV head) pair per task, with the query heads of that KV group sharing the reads (GQA). It computes in
float32 whatever the cache dtype.

Compiled with ``torch.utils.cpp_extension.load_inline`` (needs a C++ compiler and ninja) into torch's extension
cache, so the build happens once per machine. If it cannot be built, ``load()`` returns None and the torch path is
used; ``tests/model/test_cpu_kernel.py`` holds the two equal.
"""

from __future__ import annotations

import threading

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

template <typename scalar_t>
static void decode_impl(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                        const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale,
                        torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = H / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = seq_lens.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, kvh = task % Hkv;
      const int64_t L = lp[b];
      scores.assign(G * L, 0.f);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = static_cast<float>(qp[(b * H + kvh * G + g) * D + d]) * fscale;
      // scores[g][t] = q_g . k_t
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = tp[b * max_blocks + t / bs];
        const scalar_t* krow = kp + ((blk * bs + t % bs) * Hkv + kvh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qg[d] * static_cast<float>(krow[d]);
          scores[g * L + t] = s;
        }
      }
      // softmax over t, per query head
      for (int64_t g = 0; g < G; ++g) {
        float* sg = scores.data() + g * L;
        float m = -INFINITY;
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) { sg[t] = std::exp(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < L; ++t) sg[t] *= inv;
      }
      // out_g = sum_t p[g][t] v_t
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const int64_t blk = tp[b * max_blocks + t / bs];
        const scalar_t* vrow = vp + ((blk * bs + t % bs) * Hkv + kvh) * D;
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* ag = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) ag[d] += p * static_cast<float>(vrow[d]);
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          op[(b * H + kvh * G + g) * D + d] = static_cast<scalar_t>(acc[g * D + d]);
    }
  });
}

// q [B, H, D]; k_cache/v_cache [num_blocks, block_size, Hkv, D]; block_tables [B, max_blocks] int64;
// seq_lens [B] int64 (each >= 1). Returns [B, H, D].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(block_tables.is_contiguous() && seq_lens.is_contiguous(), "contiguous tables only");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  auto out = torch::empty_like(q);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, q.scalar_type(),
                                  "paged_decode_attention", [&] {
    decode_impl<scalar_t>(q, k_cache, v_cache, block_tables, seq_lens, scale, out);
  });
  return out;
}
"""

_lock = threading.Lock()
_module = None
_failed: str | None = None


def load():
    """The compiled module, or None when it cannot be built here (the reason is in ``build_error()``)."""
    global _module, _failed
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load_inline

                _put_ninja_on_path()
                _module = load_inline(
                    name="tokenmill_cpu_attention_v3",
                    cpp_sources=_SOURCE,
                    functions=["paged_decode_attention"],
                    extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
                                  "-fno-trapping-math", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # no compiler, no ninja, ...: fall back to the torch path
                _failed = f"{type(e).__name__}: {e}"
        return _module


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the pip-installed one lives in the venv's bin, which a non-activated
    interpreter does not have on PATH."""
    import os
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def build_error() -> str | None:
    return _failed
