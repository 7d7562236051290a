"""C++ source of the CPU sparse matmul kernels (compiled on first use, see :mod:`._ext`).

Two weight formats, both fp32 values in row-major order of the non-zeros:

* ``bitmask`` - per output row, one uint16 bit mask per 16 input columns plus the packed
  non-zero values (4 B per non-zero + 1 bit per weight). On AVX-512 the inner loop expands
  16 packed values into a vector with ``vexpandps`` and does one FMA with 16 inputs, so the
  loop is dense and vectorised while reading only the non-zeros.
* ``csr`` - classic CSR with uint16 column indices (6 B per non-zero). At batch > 1 the input
  is transposed to ``[in, B]`` so each non-zero does a vector FMA across the batch.

Rows are split across threads with ``at::parallel_for`` (CSR: balanced by non-zeros).
Every kernel has a portable scalar path; the AVX-512 paths are used when the compiler
targets a CPU that has AVX-512 (the extension is built with ``-march=native``).
"""

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kMinWorkPerTask = 16384;  // multiply-adds below which a task is not split

inline int64_t grain_for(int64_t rows, int64_t work) {
  if (rows <= 0) return 1;
  int64_t per_row = std::max<int64_t>(1, work / rows);
  return std::max<int64_t>(1, kMinWorkPerTask / per_row);
}

// Run f(r0, r1) over row ranges whose non-zero counts are about equal.
template <typename F>
void parallel_rows_by_nnz(const int64_t* rp, int64_t rows, int64_t work_scale, bool serial, const F& f) {
  const int64_t total = rp[rows];
  int64_t nt = serial ? 1 : at::get_num_threads();
  if (nt <= 1 || total * work_scale < 2 * kMinWorkPerTask || rows < 2 || at::in_parallel_region()) {
    f(0, rows);
    return;
  }
  nt = std::min<int64_t>(nt, rows);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      auto find = [&](int64_t target) -> int64_t {
        return std::lower_bound(rp, rp + rows + 1, target) - rp;
      };
      int64_t r0 = (t == 0) ? 0 : std::min(find(total * t / nt), rows);
      int64_t r1 = (t == nt - 1) ? rows : std::min(find(total * (t + 1) / nt), rows);
      if (r1 > r0) f(r0, r1);
    }
  });
}

inline float bias_at(const float* bias, int64_t r) { return bias ? bias[r] : 0.0f; }

// ---------------------------------------------------------------- bitmask, batch 1
void bm_rows_b1(const uint16_t* masks, const float* vals, const int64_t* rp, const float* x,
                int64_t in, int64_t C, const float* bias, float* y, int64_t r0, int64_t r1) {
  const int64_t full = in / 16;
  const int tail = static_cast<int>(in % 16);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* m = masks + r * C;
    const float* v = vals + rp[r];
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 4 <= full; c += 4) {
      const __mmask16 m0 = m[c], m1 = m[c + 1], m2 = m[c + 2], m3 = m[c + 3];
      const __m512 w0 = _mm512_maskz_expandloadu_ps(m0, v); v += __builtin_popcount(m0);
      const __m512 w1 = _mm512_maskz_expandloadu_ps(m1, v); v += __builtin_popcount(m1);
      const __m512 w2 = _mm512_maskz_expandloadu_ps(m2, v); v += __builtin_popcount(m2);
      const __m512 w3 = _mm512_maskz_expandloadu_ps(m3, v); v += __builtin_popcount(m3);
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 16 * c), a0);
      a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16 * c + 16), a1);
      a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + 16 * c + 32), a2);
      a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + 16 * c + 48), a3);
    }
    for (; c < full; ++c) {
      const __mmask16 m0 = m[c];
      const __m512 w0 = _mm512_maskz_expandloadu_ps(m0, v); v += __builtin_popcount(m0);
      a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 16 * c), a0);
    }
    if (tail) {
      const __mmask16 m0 = m[c];
      const __m512 w0 = _mm512_maskz_expandloadu_ps(m0, v);
      const __m512 xv = _mm512_maskz_loadu_ps((__mmask16)((1u << tail) - 1u), x + 16 * c);
      a0 = _mm512_fmadd_ps(w0, xv, a0);
    }
    a0 = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    y[r] = _mm512_reduce_add_ps(a0) + bias_at(bias, r);
#else
    float acc = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      uint32_t mm = m[c];
      const float* xc = x + 16 * c;
      while (mm) {
        const int j = __builtin_ctz(mm);
        acc += (*v++) * xc[j];
        mm &= mm - 1;
      }
    }
    y[r] = acc + bias_at(bias, r);
#endif
  }
}

// ---------------------------------------------------------------- bitmask, batch B (x: [B, in])
template <int TB>
void bm_rows_bt(const uint16_t* masks, const float* vals, const int64_t* rp, const float* x,
                int64_t in, int64_t C, int64_t B, int64_t b0, const float* bias, float* y,
                int64_t out, int64_t r0, int64_t r1) {
  const int64_t full = in / 16;
  const int tail = static_cast<int>(in % 16);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* m = masks + r * C;
    const float* v = vals + rp[r];
#if defined(__AVX512F__)
    __m512 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c < full; ++c) {
      const __mmask16 m0 = m[c];
      if (!m0) continue;
      const __m512 w0 = _mm512_maskz_expandloadu_ps(m0, v); v += __builtin_popcount(m0);
      for (int t = 0; t < TB; ++t)
        acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (b0 + t) * in + 16 * c), acc[t]);
    }
    if (tail) {
      const __mmask16 m0 = m[c];
      const __m512 w0 = _mm512_maskz_expandloadu_ps(m0, v);
      const __mmask16 tm = (__mmask16)((1u << tail) - 1u);
      for (int t = 0; t < TB; ++t)
        acc[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(tm, x + (b0 + t) * in + 16 * c), acc[t]);
    }
    for (int t = 0; t < TB; ++t) y[(b0 + t) * out + r] = _mm512_reduce_add_ps(acc[t]) + bias_at(bias, r);
#else
    float acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = 0.0f;
    for (int64_t c = 0; c < C; ++c) {
      uint32_t mm = m[c];
      while (mm) {
        const int j = __builtin_ctz(mm);
        const float w = *v++;
        for (int t = 0; t < TB; ++t) acc[t] += w * x[(b0 + t) * in + 16 * c + j];
        mm &= mm - 1;
      }
    }
    for (int t = 0; t < TB; ++t) y[(b0 + t) * out + r] = acc[t] + bias_at(bias, r);
#endif
  }
}

// ---------------------------------------------------------------- CSR, batch 1
// Scalar with four accumulators: ~1 cycle per non-zero (load-port bound). AVX-512 gathers were
// measured slower on the row lengths of pruned LLM layers (Zen 4), so they are not used.
void csr_rows_b1(const float* vals, const uint16_t* cols, const int64_t* rp, const float* x,
                 const float* bias, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    int64_t k = rp[r];
    const int64_t e = rp[r + 1];
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    for (; k + 4 <= e; k += 4) {
      s0 += vals[k] * x[cols[k]];
      s1 += vals[k + 1] * x[cols[k + 1]];
      s2 += vals[k + 2] * x[cols[k + 2]];
      s3 += vals[k + 3] * x[cols[k + 3]];
    }
    for (; k < e; ++k) s0 += vals[k] * x[cols[k]];
    y[r] = ((s0 + s1) + (s2 + s3)) + bias_at(bias, r);
  }
}

// ---------------------------------------------------------------- CSR, batch B (xt: [in, Bp])
template <int TB>
void csr_rows_bt(const float* vals, const uint16_t* cols, const int64_t* rp, const float* xt,
                 int64_t Bp, int64_t B, int64_t b0, const float* bias, float* y, int64_t out,
                 int64_t r0, int64_t r1) {
  const int64_t nb = std::min<int64_t>(TB, B - b0);
  for (int64_t r = r0; r < r1; ++r) {
    alignas(64) float acc[TB];
#if defined(__AVX512F__)
    if constexpr (TB == 8) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
        const float* xr = xt + static_cast<int64_t>(cols[k]) * Bp + b0;
        a = _mm256_fmadd_ps(_mm256_set1_ps(vals[k]), _mm256_loadu_ps(xr), a);
      }
      _mm256_store_ps(acc, a);
      const float bb8 = bias_at(bias, r);
      for (int64_t t = 0; t < nb; ++t) y[(b0 + t) * out + r] = acc[t] + bb8;
      continue;
    }
    constexpr int NV = TB / 16 > 0 ? TB / 16 : 1;
    __m512 a[NV];
    for (int t = 0; t < NV; ++t) a[t] = _mm512_setzero_ps();
    for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
      const __m512 w = _mm512_set1_ps(vals[k]);
      const float* xr = xt + static_cast<int64_t>(cols[k]) * Bp + b0;
      for (int t = 0; t < NV; ++t) a[t] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * t), a[t]);
    }
    for (int t = 0; t < NV; ++t) _mm512_store_ps(acc + 16 * t, a[t]);
#else
    for (int t = 0; t < TB; ++t) acc[t] = 0.0f;
    for (int64_t k = rp[r]; k < rp[r + 1]; ++k) {
      const float w = vals[k];
      const float* xr = xt + static_cast<int64_t>(cols[k]) * Bp + b0;
      for (int t = 0; t < TB; ++t) acc[t] += w * xr[t];
    }
#endif
    const float bb = bias_at(bias, r);
    for (int64_t t = 0; t < nb; ++t) y[(b0 + t) * out + r] = acc[t] + bb;
  }
}

void check_common(const torch::Tensor& x, const torch::Tensor& vals, const torch::Tensor& rp,
                  const c10::optional<torch::Tensor>& bias, int64_t out) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "sparsetorch kernel: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(vals.scalar_type() == torch::kFloat32 && vals.is_contiguous(), "values must be contiguous float32");
  TORCH_CHECK(rp.scalar_type() == torch::kInt64 && rp.is_contiguous() && rp.numel() == out + 1,
              "row_ptr must be int64 of length out+1");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out,
                "bias must be contiguous float32 of length out");
  }
}

}  // namespace

torch::Tensor bitmask_matmul(torch::Tensor x, torch::Tensor masks, torch::Tensor vals,
                             torch::Tensor rp, c10::optional<torch::Tensor> bias, int64_t out,
                             bool serial) {
  check_common(x, vals, rp, bias, out);
  const int64_t B = x.size(0), in = x.size(1), C = (in + 15) / 16;
  TORCH_CHECK(masks.scalar_type() == torch::kInt16 && masks.is_contiguous() && masks.numel() == out * C,
              "masks must be contiguous int16 [out, ceil(in/16)]");
  auto y = torch::empty({B, out}, x.options());
  const auto* mp = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
  const float* vp = vals.data_ptr<float>();
  const int64_t* rpp = rp.data_ptr<int64_t>();
  const float* xp = x.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (B == 1) {
    const int64_t work = C * 4 + rpp[out];
    at::parallel_for(0, out, serial ? out + 1 : grain_for(out, work), [&](int64_t r0, int64_t r1) {
      bm_rows_b1(mp, vp, rpp, xp, in, C, bp, yp, r0, r1);
    });
    return y;
  }
  const int64_t work = (C * 4 + rpp[out]) * B;
  at::parallel_for(0, out, serial ? out + 1 : grain_for(out, work), [&](int64_t r0, int64_t r1) {
    int64_t b0 = 0;
    for (; b0 + 8 <= B; b0 += 8) bm_rows_bt<8>(mp, vp, rpp, xp, in, C, B, b0, bp, yp, out, r0, r1);
    for (; b0 + 4 <= B; b0 += 4) bm_rows_bt<4>(mp, vp, rpp, xp, in, C, B, b0, bp, yp, out, r0, r1);
    for (; b0 < B; ++b0) bm_rows_bt<1>(mp, vp, rpp, xp, in, C, B, b0, bp, yp, out, r0, r1);
  });
  return y;
}

torch::Tensor csr_matmul(torch::Tensor x, torch::Tensor vals, torch::Tensor cols, torch::Tensor rp,
                         c10::optional<torch::Tensor> bias, int64_t out, bool serial) {
  check_common(x, vals, rp, bias, out);
  TORCH_CHECK(cols.scalar_type() == torch::kInt16 && cols.is_contiguous() && cols.numel() == vals.numel(),
              "cols must be contiguous int16 with one entry per value");
  TORCH_CHECK(x.size(1) <= 65536, "csr kernel supports at most 65536 input features");
  const int64_t B = x.size(0);
  auto y = torch::empty({B, out}, x.options());
  const auto* cp = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
  const float* vp = vals.data_ptr<float>();
  const int64_t* rpp = rp.data_ptr<int64_t>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (B == 1) {
    const float* xp = x.data_ptr<float>();
    parallel_rows_by_nnz(rpp, out, 1, serial, [&](int64_t r0, int64_t r1) {
      csr_rows_b1(vp, cp, rpp, xp, bp, yp, r0, r1);
    });
    return y;
  }
  const int64_t Bp = B <= 8 ? 8 : (B + 15) / 16 * 16;
  auto xt = torch::zeros({x.size(1), Bp}, x.options());
  xt.narrow(1, 0, B).copy_(x.t());
  const float* xtp = xt.data_ptr<float>();
  parallel_rows_by_nnz(rpp, out, B, serial, [&](int64_t r0, int64_t r1) {
    int64_t b0 = 0;
    for (; b0 + 64 <= Bp; b0 += 64) csr_rows_bt<64>(vp, cp, rpp, xtp, Bp, B, b0, bp, yp, out, r0, r1);
    for (; b0 + 32 <= Bp; b0 += 32) csr_rows_bt<32>(vp, cp, rpp, xtp, Bp, B, b0, bp, yp, out, r0, r1);
    for (; b0 + 16 <= Bp; b0 += 16) csr_rows_bt<16>(vp, cp, rpp, xtp, Bp, B, b0, bp, yp, out, r0, r1);
    for (; b0 < Bp; b0 += 8) csr_rows_bt<8>(vp, cp, rpp, xtp, Bp, B, b0, bp, yp, out, r0, r1);
  });
  return y;
}

// Activation-sparse product (TEAL/WINA thresholded activations, the threshold applied here so
// no separate masking pass is needed; threshold 0 skips exact zeros only): wt is the weight transposed, [in, out] row-major, so the weights of input i
// are one contiguous row. For each row of x, only the rows of wt whose input is non-zero are
// read: y = b + sum over live i of x_i * wt[i, :]. Threads split the outputs into tiles; each
// tile walks the live list and does a contiguous AXPY (the compiler vectorises it).
torch::Tensor colgather_matmul(torch::Tensor x, torch::Tensor wt, c10::optional<torch::Tensor> bias,
                               double threshold, c10::optional<torch::Tensor> scale, bool serial) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "sparsetorch kernel: x must be a contiguous 2-D float32 CPU tensor");
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == torch::kFloat32 && wt.is_contiguous() && wt.size(0) == x.size(1),
              "wt must be a contiguous float32 [in, out] tensor");
  const int64_t B = x.size(0), in = x.size(1), out = wt.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() && bias->numel() == out,
                "bias must be contiguous float32 of length out");
  }
  auto y = torch::empty({B, out}, x.options());
  const float* wp = wt.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->scalar_type() == torch::kFloat32 && scale->is_contiguous() && scale->numel() == in,
                "scale must be contiguous float32 of length in");
  }
  const float* sp = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  const float t = static_cast<float>(threshold);
  std::vector<int32_t> live;
  live.reserve(in);
  for (int64_t b = 0; b < B; ++b) {
    const float* xp = x.data_ptr<float>() + b * in;
    float* yp = y.data_ptr<float>() + b * out;
    live.clear();
    // live: non-zero and at or above the threshold (TEAL |x_i| >= t; WINA |x_i| * scale_i >= t)
    for (int64_t i = 0; i < in; ++i) {
      const float a = sp ? std::fabs(xp[i]) * sp[i] : std::fabs(xp[i]);
      if (xp[i] != 0.0f && a >= t) live.push_back(static_cast<int32_t>(i));
    }
    const int64_t n = static_cast<int64_t>(live.size());
    const int64_t tile = 256;
    const int64_t tiles = (out + tile - 1) / tile;
    auto body = [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t o0 = t * tile, o1 = std::min(out, o0 + tile);
        float* __restrict__ yt = yp + o0;
        const int64_t w = o1 - o0;
        if (bp) {
          for (int64_t j = 0; j < w; ++j) yt[j] = bp[o0 + j];
        } else {
          for (int64_t j = 0; j < w; ++j) yt[j] = 0.0f;
        }
        for (int64_t k = 0; k < n; ++k) {
          const int64_t i = live[k];
          const float xi = xp[i];
          const float* __restrict__ row = wp + i * out + o0;
          for (int64_t j = 0; j < w; ++j) yt[j] += xi * row[j];
        }
      }
    };
    const int64_t work = n * out;
    if (serial || work < 2 * kMinWorkPerTask || at::in_parallel_region()) {
      body(0, tiles);
    } else {
      at::parallel_for(0, tiles, 1, body);
    }
  }
  return y;
}

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}
"""

FUNCTIONS = ["bitmask_matmul", "csr_matmul", "colgather_matmul", "has_avx512"]
