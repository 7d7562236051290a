"""C++ source of the low-overhead decode engine and of the fp16/bf16/int8 weight kernels.

Compiled on first use by :mod:`._decode_ext` (a second extension, so the fp32 kernels of
:mod:`._csrc` keep their cached build). Two parts:

* **Linear kernels** ``y = x @ W.T (* scale) + b`` for one weight in one of three formats
  (``dense`` row-major, ``bitmask`` = one uint16 bit mask per 16 inputs + packed non-zeros,
  ``csr`` = uint16 column indices + packed non-zeros) with values stored as fp32, fp16, bf16 or
  int8 (int8: symmetric, one fp32 scale per output row, applied after the row's dot product).
  Every product accumulates in fp32. At one input row (decode) each output row is one fused
  loop: AVX-512 loads (dense) or ``vpexpand`` loads (bitmask; ``vexpandps`` for fp32,
  ``vpexpandw``/``vpexpandb`` for 16-/8-bit values, AVX512-VBMI2) of 16 weights, converted to
  fp32 in registers, one FMA with 16 inputs. With several rows (prefill) each weight row is
  decoded once into an fp32 scratch row and dotted with every input row.
* **Engine**: a Llama-family decoder (RMSNorm, RoPE from a precomputed table, grouped-query
  attention over a static fp32 KV cache, SiLU-gated MLP, tied or untied head) run entirely in
  C++ per call: one Python call per generated token, no per-layer dispatch, one parallel
  region per matrix product. q/k/v and gate/up are fused into one matrix each.

Output rows are split across ``at::get_num_threads()`` threads. Portable scalar paths exist
for CPUs without AVX-512 (and without VBMI2 for the 8/16-bit bitmask paths).
"""

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <new>
#include <pthread.h>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__F16C__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

enum Fmt : int64_t { DENSE = 0, BITMASK = 1, CSR = 2 };
enum DT : int64_t { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };

inline int64_t dt_size(int64_t dt) { return dt == F32 ? 4 : (dt == I8 ? 1 : 2); }

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t s = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t f;
  if (e == 0) {
    if (m == 0) { f = s; } else {
      float v = std::ldexp(static_cast<float>(m), -24);
      std::memcpy(&f, &v, 4); f |= s;
    }
  } else if (e == 31) { f = s | 0x7f800000u | (m << 13); }
  else { f = s | ((e + 112) << 23) | (m << 13); }
  float out; std::memcpy(&out, &f, 4); return out;
#endif
}

inline float bf16_to_float(uint16_t h) {
  uint32_t f = static_cast<uint32_t>(h) << 16;
  float out; std::memcpy(&out, &f, 4); return out;
}

template <int D>
inline float scalar_at(const void* base, int64_t i) {
  if constexpr (D == F32) return static_cast<const float*>(base)[i];
  else if constexpr (D == F16) return half_to_float(static_cast<const uint16_t*>(base)[i]);
  else if constexpr (D == BF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  else return static_cast<float>(static_cast<const int8_t*>(base)[i]);
}

// out/in/chunks/rp/masks/cols describe the *stored* matrix: W [out, in], or W^T when trans (then
// the stored rows are the inputs). lo/li are the product's own output/input sizes either way.
// thr >= 0: activation threshold on the input (an entry with |x_i| < thr counts as zero).
struct Lin {
  int64_t fmt = DENSE, dt = F32, out = 0, in = 0, chunks = 0, lo = 0, li = 0;
  bool trans = false;
  float thr = -1.0f;
  torch::Tensor values, masks, cols, row_ptr, scales, bias;  // owners
  const void* v = nullptr;
  const uint16_t* m = nullptr;
  const uint16_t* c = nullptr;
  const int64_t* rp = nullptr;
  const float* s = nullptr;
  const float* b = nullptr;
};

bool defined_nonempty(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

// deep: also check every row's non-zero count and column index (O(size); skipped for trusted packs)
// out/in: the product's sizes (y[out] = W[out, in] x); with trans the tensors hold W^T [in, out]
Lin make_lin(int64_t fmt, int64_t dt, int64_t lout, int64_t lin_, torch::Tensor values, torch::Tensor masks,
             torch::Tensor cols, torch::Tensor row_ptr, torch::Tensor scales, torch::Tensor bias, bool deep = true,
             bool trans = false, double thr = -1.0) {
  TORCH_CHECK(fmt >= DENSE && fmt <= CSR, "unknown weight format ", fmt);
  TORCH_CHECK(dt >= F32 && dt <= I8, "unknown value dtype ", dt);
  static const c10::ScalarType want[4] = {torch::kFloat32, torch::kFloat16, torch::kBFloat16, torch::kInt8};
  Lin L;
  const int64_t out = trans ? lin_ : lout, in = trans ? lout : lin_;  // the stored matrix
  L.fmt = fmt; L.dt = dt; L.out = out; L.in = in; L.chunks = (in + 15) / 16;
  L.lo = lout; L.li = lin_; L.trans = trans; L.thr = static_cast<float>(thr);
  TORCH_CHECK(!trans || in <= 65536 || fmt != CSR, "csr holds at most 65536 columns");
  TORCH_CHECK(values.device().is_cpu() && values.is_contiguous() && values.scalar_type() == want[dt],
              "values must be a contiguous CPU tensor of dtype ", c10::toString(want[dt]));
  L.values = values; L.v = values.data_ptr();
  if (fmt == DENSE) {
    TORCH_CHECK(values.numel() == out * in, "dense values must have out*in elements");
  } else {
    TORCH_CHECK(row_ptr.scalar_type() == torch::kInt64 && row_ptr.is_contiguous() && row_ptr.numel() == out + 1,
                "row_ptr must be contiguous int64 of length out+1");
    L.row_ptr = row_ptr; L.rp = row_ptr.data_ptr<int64_t>();
    TORCH_CHECK(L.rp[0] == 0 && L.rp[out] == values.numel(), "row_ptr must run from 0 to the number of values");
    if (deep) for (int64_t r = 0; r < out; ++r) TORCH_CHECK(L.rp[r] <= L.rp[r + 1], "row_ptr must not decrease");
    if (fmt == BITMASK) {
      TORCH_CHECK(masks.scalar_type() == torch::kInt16 && masks.is_contiguous() && masks.numel() == out * L.chunks,
                  "masks must be contiguous int16 [out, ceil(in/16)]");
      L.masks = masks; L.m = reinterpret_cast<const uint16_t*>(masks.data_ptr<int16_t>());
      for (int64_t r = 0; deep && r < out; ++r) {
        int64_t n = 0;
        for (int64_t k = 0; k < L.chunks; ++k) n += __builtin_popcount(L.m[r * L.chunks + k]);
        TORCH_CHECK(n == L.rp[r + 1] - L.rp[r], "bitmask popcount does not match row_ptr in row ", r);
      }
      if (deep && in % 16) {
        const uint16_t tail_ok = static_cast<uint16_t>((1u << (in % 16)) - 1u);
        for (int64_t r = 0; r < out; ++r)
          TORCH_CHECK((L.m[r * L.chunks + L.chunks - 1] & ~tail_ok) == 0, "bitmask has bits beyond in_features");
      }
    } else {
      TORCH_CHECK(cols.scalar_type() == torch::kInt16 && cols.is_contiguous() && cols.numel() == values.numel(),
                  "cols must be contiguous int16 with one entry per value");
      L.cols = cols; L.c = reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>());
      for (int64_t k = 0; deep && k < cols.numel(); ++k) TORCH_CHECK(L.c[k] < in, "column index out of range");
    }
  }
  if (dt == I8) {
    TORCH_CHECK(scales.defined() && scales.scalar_type() == torch::kFloat32 && scales.is_contiguous() &&
                scales.numel() == lout, "int8 values need float32 scales, one per output row");
    L.scales = scales; L.s = scales.data_ptr<float>();
  }
  if (defined_nonempty(bias)) {
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == lout,
                "bias must be contiguous float32 of length out");
    L.bias = bias; L.b = bias.data_ptr<float>();
  }
  return L;
}

#if defined(__AVX512F__)
template <int D>
inline __m512 load16(const void* base, int64_t i) {
  if constexpr (D == F32) return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  else if constexpr (D == F16)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
  else if constexpr (D == BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i))), 16));
  else
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + i))));
}

template <int D>
inline __m512 load16_tail(const void* base, int64_t i, __mmask16 k) {
  if constexpr (D == F32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + i);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  else if constexpr (D == F16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + i));
  else if constexpr (D == BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + i)), 16));
  else return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, static_cast<const int8_t*>(base) + i)));
#else
  else {
    alignas(64) float t[16];
    for (int j = 0; j < 16; ++j) t[j] = ((k >> j) & 1) ? scalar_at<D>(base, i + j) : 0.0f;
    return _mm512_load_ps(t);
  }
#endif
}

#if defined(__AVX512VBMI2__) && defined(__AVX512VL__)
#define ST_HAVE_EXPAND 1
#endif

// 16 weights expanded from the packed non-zeros at element offset i under mask k (zeros elsewhere)
template <int D>
inline __m512 expand16(const void* base, int64_t i, __mmask16 k) {
  if constexpr (D == F32) return _mm512_maskz_expandloadu_ps(k, static_cast<const float*>(base) + i);
#if defined(ST_HAVE_EXPAND)
  else if constexpr (D == F16) return _mm512_cvtph_ps(_mm256_maskz_expandloadu_epi16(k, static_cast<const uint16_t*>(base) + i));
  else if constexpr (D == BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
        _mm256_maskz_expandloadu_epi16(k, static_cast<const uint16_t*>(base) + i)), 16));
  else return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_expandloadu_epi8(k, static_cast<const int8_t*>(base) + i)));
#else
  else {
    alignas(64) float t[16];
    int64_t p = i;
    for (int j = 0; j < 16; ++j) t[j] = ((k >> j) & 1) ? scalar_at<D>(base, p++) : 0.0f;
    return _mm512_load_ps(t);
  }
#endif
}

// expand16 with a plain (unmasked) load of the 16 packed values at i and the register form of
// the expand: the caller guarantees i + 16 <= the number of values. The memory form of
// vpexpand is microcoded on some cores (Sapphire Rapids) and slows with regular masks (2:4)
template <int D>
inline __m512 expand16_reg(const void* base, int64_t i, __mmask16 k) {
  if constexpr (D == F32) return _mm512_maskz_expand_ps(k, _mm512_loadu_ps(static_cast<const float*>(base) + i));
#if defined(ST_HAVE_EXPAND)
  else if constexpr (D == F16)
    return _mm512_cvtph_ps(_mm256_maskz_expand_epi16(
        k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i))));
  else if constexpr (D == BF16)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_expand_epi16(
        k, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)))), 16));
  else
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_expand_epi8(
        k, _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + i)))));
#else
  else return expand16<D>(base, i, k);
#endif
}
template <int D, bool REG>
inline __m512 expand16x(const void* base, int64_t i, __mmask16 k) {
  if constexpr (REG) return expand16_reg<D>(base, i, k); else return expand16<D>(base, i, k);
}
#endif

// ---------------------------------------------------------------- one output row, one input row
// software prefetch distances in bytes (values, bitmasks) of the one-row kernels
#ifndef ST_PF_VALUES
#define ST_PF_VALUES 2048
#define ST_PF_MASKS 512
#endif
template <int D>
inline float dot_dense(const Lin& L, int64_t r, const float* x) {
  const int64_t in = L.in, off = r * in;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  constexpr int64_t VSZ = D == F32 ? 4 : (D == I8 ? 1 : 2);
  const char* vb = static_cast<const char*>(L.v);
  int64_t i = 0;
  for (; i + 64 <= in; i += 64) {
    for (int64_t q = 0; q < 64 * VSZ; q += 64) _mm_prefetch(vb + (off + i) * VSZ + ST_PF_VALUES + q, _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(load16<D>(L.v, off + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(load16<D>(L.v, off + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(load16<D>(L.v, off + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(load16<D>(L.v, off + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  for (; i + 16 <= in; i += 16) a0 = _mm512_fmadd_ps(load16<D>(L.v, off + i), _mm512_loadu_ps(x + i), a0);
  if (i < in) {
    const __mmask16 k = static_cast<__mmask16>((1u << (in - i)) - 1u);
    a1 = _mm512_fmadd_ps(load16_tail<D>(L.v, off + i, k), _mm512_maskz_loadu_ps(k, x + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  int64_t i = 0;
  for (; i + 4 <= in; i += 4) {
    s0 += scalar_at<D>(L.v, off + i) * x[i];
    s1 += scalar_at<D>(L.v, off + i + 1) * x[i + 1];
    s2 += scalar_at<D>(L.v, off + i + 2) * x[i + 2];
    s3 += scalar_at<D>(L.v, off + i + 3) * x[i + 3];
  }
  for (; i < in; ++i) s0 += scalar_at<D>(L.v, off + i) * x[i];
  return (s0 + s1) + (s2 + s3);
#endif
}

template <int D, bool REG>
inline float dot_bitmask_(const Lin& L, int64_t r, const float* x);

// a row whose every expand can read 16 values without passing the end of the values uses the
// register form (expand16_reg); the last rows of a matrix the masked memory form
template <int D>
inline float dot_bitmask(const Lin& L, int64_t r, const float* x) {
  return L.rp[r + 1] + 16 <= L.rp[L.out] ? dot_bitmask_<D, true>(L, r, x) : dot_bitmask_<D, false>(L, r, x);
}

template <int D, bool REG>
inline float dot_bitmask_(const Lin& L, int64_t r, const float* x) {
  constexpr int64_t VSZ = D == F32 ? 4 : (D == I8 ? 1 : 2);
  const uint16_t* m = L.m + r * L.chunks;
  int64_t p = L.rp[r];
  const int64_t full = L.in / 16;
  const int tail = static_cast<int>(L.in % 16);
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  // software prefetch of the values ST_PF_VALUES bytes ahead (one cache line per 64 weights,
  // two for fp32: about what 64 weights at 50% density take) and of the masks: the expand +
  // convert per 16 weights keeps too few loads in flight for the hardware prefetchers alone to
  // reach the streaming bandwidth
  const char* vb = static_cast<const char*>(L.v);
  int64_t c = 0;
  for (; c + 4 <= full; c += 4) {
    const __mmask16 m0 = m[c], m1 = m[c + 1], m2 = m[c + 2], m3 = m[c + 3];
    _mm_prefetch(vb + p * VSZ + ST_PF_VALUES, _MM_HINT_T0);
    if constexpr (VSZ == 4) _mm_prefetch(vb + p * VSZ + ST_PF_VALUES + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(m + c) + ST_PF_MASKS, _MM_HINT_T0);
    const __m512 w0 = expand16x<D, REG>(L.v, p, m0); p += __builtin_popcount(m0);
    const __m512 w1 = expand16x<D, REG>(L.v, p, m1); p += __builtin_popcount(m1);
    const __m512 w2 = expand16x<D, REG>(L.v, p, m2); p += __builtin_popcount(m2);
    const __m512 w3 = expand16x<D, REG>(L.v, p, m3); p += __builtin_popcount(m3);
    a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + 16 * c), a0);
    a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16 * c + 16), a1);
    a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + 16 * c + 32), a2);
    a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + 16 * c + 48), a3);
  }
  for (; c < full; ++c) {
    const __mmask16 m0 = m[c];
    a0 = _mm512_fmadd_ps(expand16x<D, REG>(L.v, p, m0), _mm512_loadu_ps(x + 16 * c), a0);
    p += __builtin_popcount(m0);
  }
  if (tail) {
    const __mmask16 m0 = m[c];
    const __m512 xv = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << tail) - 1u), x + 16 * c);
    a1 = _mm512_fmadd_ps(expand16x<D, REG>(L.v, p, m0), xv, a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#else
  float acc = 0.0f;
  for (int64_t c = 0; c < L.chunks; ++c) {
    uint32_t mm = m[c];
    while (mm) {
      const int j = __builtin_ctz(mm);
      acc += scalar_at<D>(L.v, p++) * x[16 * c + j];
      mm &= mm - 1;
    }
  }
  (void)full; (void)tail;
  return acc;
#endif
}

template <int D>
inline float dot_csr(const Lin& L, int64_t r, const float* x) {
  int64_t k = L.rp[r];
  const int64_t e = L.rp[r + 1];
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  for (; k + 4 <= e; k += 4) {
    s0 += scalar_at<D>(L.v, k) * x[L.c[k]];
    s1 += scalar_at<D>(L.v, k + 1) * x[L.c[k + 1]];
    s2 += scalar_at<D>(L.v, k + 2) * x[L.c[k + 2]];
    s3 += scalar_at<D>(L.v, k + 3) * x[L.c[k + 3]];
  }
  for (; k < e; ++k) s0 += scalar_at<D>(L.v, k) * x[L.c[k]];
  return (s0 + s1) + (s2 + s3);
}

template <int F, int D>
void rows_b1(const Lin& L, const float* x, float* y, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    float acc;
    if constexpr (F == DENSE) acc = dot_dense<D>(L, r, x);
    else if constexpr (F == BITMASK) acc = dot_bitmask<D>(L, r, x);
    else acc = dot_csr<D>(L, r, x);
    if constexpr (D == I8) acc *= L.s[r];
    y[r] = acc + (L.b ? L.b[r] : 0.0f);
  }
}

// the weight row r as fp32 (unscaled for int8) into buf[in]
template <int F, int D>
void decode_row(const Lin& L, int64_t r, float* buf) {
  const int64_t in = L.in;
  if constexpr (F == DENSE) {
    for (int64_t i = 0; i < in; ++i) buf[i] = scalar_at<D>(L.v, r * in + i);
  } else if constexpr (F == BITMASK) {
    std::fill(buf, buf + in, 0.0f);
    const uint16_t* m = L.m + r * L.chunks;
    int64_t p = L.rp[r];
    for (int64_t c = 0; c < L.chunks; ++c) {
      uint32_t mm = m[c];
      while (mm) {
        const int j = __builtin_ctz(mm);
        buf[16 * c + j] = scalar_at<D>(L.v, p++);
        mm &= mm - 1;
      }
    }
  } else {
    std::fill(buf, buf + in, 0.0f);
    for (int64_t k = L.rp[r]; k < L.rp[r + 1]; ++k) buf[L.c[k]] = scalar_at<D>(L.v, k);
  }
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), a1);
  }
  for (; i + 16 <= n; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), a0);
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1u);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
#endif
}

template <int F, int D>
void rows_bt(const Lin& L, const float* x, int64_t B, float* y, int64_t r0, int64_t r1) {
  std::vector<float> buf(L.in);
  for (int64_t r = r0; r < r1; ++r) {
    decode_row<F, D>(L, r, buf.data());
    const float sc = (D == I8) ? L.s[r] : 1.0f;
    const float bb = L.b ? L.b[r] : 0.0f;
    for (int64_t t = 0; t < B; ++t) {
      float acc = dot_f32(buf.data(), x + t * L.in, L.in);
      if constexpr (D == I8) acc *= sc;
      y[t * L.out + r] = acc + bb;
    }
  }
}

// ---------------------------------------------------------------- spin pool
// Persistent helper threads that take chunks of a job from a shared counter. Unlike a fork-join
// region (OpenMP), the calling thread starts at once, takes every chunk no helper has claimed,
// and waits only for chunks a helper is running: on a machine where other processes hold the
// cores, a descheduled helper costs nothing unless it was preempted inside a chunk. Measured
// here under load, OpenMP regions per matrix made 2-thread decode 3-5x slower than 1 thread.
// Each job lives in one of kSlots slots; the claim word packs (job generation << 32 | next
// chunk), so a late helper holding a stale snapshot can never claim a chunk of a newer job.
// After fork() the child has no helpers, and the caller simply does every chunk itself.
class Pool {
 public:
  static constexpr int kSlots = 4;
  struct Slot {
    std::atomic<uint64_t> claim{0};
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> nchunks{0};
    void (*call)(void*, int64_t) = nullptr;
    void* ctx = nullptr;
  };

  explicit Pool(int helpers) {
    for (int i = 0; i < helpers; ++i) threads_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    stop_.store(true);
    { std::lock_guard<std::mutex> g(mu_); }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int helpers() const { return static_cast<int>(threads_.size()); }

  template <typename F>
  void run(int64_t nchunks, F& f) {
    const uint64_t seq = seq_.load(std::memory_order_relaxed) + 1;
    Slot& sl = slots_[seq % kSlots];
    const uint64_t gen = seq & 0xffffffffu;
    sl.nchunks.store(nchunks, std::memory_order_relaxed);
    sl.call = [](void* ctx, int64_t c) { (*static_cast<F*>(ctx))(c); };
    sl.ctx = &f;
    sl.done.store(0, std::memory_order_relaxed);
    sl.claim.store(gen << 32, std::memory_order_release);
    seq_.store(seq, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> g(mu_);
      cv_.notify_all();
    }
    work(sl, gen);
    while (sl.done.load(std::memory_order_acquire) < nchunks) pause();
  }

 private:
  static inline void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  // claim and run chunks of the job in `sl` while it is still generation `gen`
  static void work(Slot& sl, uint64_t gen) {
    while (true) {
      uint64_t c = sl.claim.load(std::memory_order_acquire);
      if ((c >> 32) != gen) return;
      const int64_t idx = static_cast<int64_t>(c & 0xffffffffu);
      if (idx >= sl.nchunks.load(std::memory_order_relaxed)) return;
      if (sl.claim.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) {
        sl.call(sl.ctx, idx);
        sl.done.fetch_add(1, std::memory_order_release);
      }
    }
  }

  void loop() {
    uint64_t seen = seq_.load(std::memory_order_acquire);
    int64_t idle = 0;
    while (!stop_.load(std::memory_order_relaxed)) {
      const uint64_t s = seq_.load(std::memory_order_acquire);
      if (s != seen) {
        seen = s;
        idle = 0;
        work(slots_[s % kSlots], s & 0xffffffffu);
        continue;
      }
      if (++idle < 200000) { pause(); continue; }          // spin ~ a few ms between jobs
      std::unique_lock<std::mutex> lk(mu_);
      sleeping_.fetch_add(1, std::memory_order_acq_rel);
      cv_.wait_for(lk, std::chrono::milliseconds(50), [&] {
        return stop_.load() || seq_.load(std::memory_order_acquire) != seen;
      });
      sleeping_.fetch_sub(1, std::memory_order_acq_rel);
      idle = 0;
    }
  }

  Slot slots_[kSlots];
  std::atomic<uint64_t> seq_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleeping_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // leaked at exit on purpose: joining threads during interpreter shutdown can hang

// one job at a time (a second Python thread calling in waits): Pool::run is not reentrant.
// A forked child gets a fresh pool: the parent's helper threads do not exist there, and one of
// them may have held the pool's mutex at the moment of the fork.
template <typename F>
void pool_run(int64_t nt, int64_t nchunks, F& f) {
  static const int atfork = pthread_atfork(nullptr, nullptr, [] { new (&g_pool_mu) std::mutex(); g_pool = nullptr; });
  (void)atfork;
  std::lock_guard<std::mutex> g(g_pool_mu);
  if (g_pool == nullptr || g_pool->helpers() != nt - 1) {
    delete g_pool;
    g_pool = new Pool(static_cast<int>(nt - 1));
  }
  g_pool->run(nchunks, f);
}

template <int F, int D>
void matmul_batched(const Lin& L, const float* x, int64_t B, float* y);

template <int F, int D>
void matmul_t(const Lin& L, const float* x, int64_t B, float* y, bool serial) {
  if (B >= 4 && !serial && !at::in_parallel_region()) { matmul_batched<F, D>(L, x, B, y); return; }
  const int64_t work = (L.fmt == DENSE ? L.out * L.in : L.rp[L.out] + L.out * L.chunks) * std::max<int64_t>(B, 1);
  const bool one = serial || work < 32768 || at::in_parallel_region() || at::get_num_threads() <= 1;
  auto body = [&](int64_t r0, int64_t r1) {
    if (B == 1) rows_b1<F, D>(L, x, y, r0, r1);
    else rows_bt<F, D>(L, x, B, y, r0, r1);
  };
  if (one) { body(0, L.out); return; }
  // dynamic chunks: several per thread, claimed from a shared counter by the calling thread and
  // the helpers of the spin pool (see Pool): a helper that is not running leaves its share to
  // the others, and the caller never waits for a thread that has not started a chunk
  const int64_t nt = at::get_num_threads();
  const int64_t nchunks = std::min<int64_t>(L.out, nt * 8);
  int64_t bounds_buf[257];
  std::vector<int64_t> bounds_vec;
  int64_t* bounds = bounds_buf;
  if (nchunks + 1 > 257) { bounds_vec.resize(nchunks + 1); bounds = bounds_vec.data(); }
  const int64_t tot = L.fmt == DENSE ? 0 : L.rp[L.out];
  for (int64_t c = 0; c <= nchunks; ++c) {
    if (c == 0) bounds[c] = 0;
    else if (c == nchunks) bounds[c] = L.out;
    else if (L.fmt == DENSE) bounds[c] = L.out * c / nchunks;
    else bounds[c] = std::min<int64_t>(L.out, std::lower_bound(L.rp, L.rp + L.out + 1, tot * c / nchunks) - L.rp);
  }
  auto chunk = [&](int64_t c) { if (bounds[c + 1] > bounds[c]) body(bounds[c], bounds[c + 1]); };
  pool_run(nt, nchunks, chunk);
}

template <int F, int D>
void matmul_batched(const Lin& L, const float* x, int64_t B, float* y) {
  torch::Tensor W;
  if constexpr (F == DENSE && D == F32) {
    W = torch::from_blob(const_cast<void*>(L.v), {L.out, L.in}, torch::kFloat32);
  } else {
    W = torch::empty({L.out, L.in}, torch::kFloat32);
    float* wp = W.data_ptr<float>();
    at::parallel_for(0, L.out, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        decode_row<F, D>(L, r, wp + r * L.in);
        if constexpr (D == I8) {
          const float sc = L.s[r];
          for (int64_t i = 0; i < L.in; ++i) wp[r * L.in + i] *= sc;
        }
      }
    });
  }
  auto X = torch::from_blob(const_cast<float*>(x), {B, L.in}, torch::kFloat32);
  auto Y = torch::from_blob(y, {B, L.out}, torch::kFloat32);
  at::mm_out(Y, X, W.t());
  if (L.b) Y.add_(torch::from_blob(const_cast<float*>(L.b), {L.out}, torch::kFloat32));
}

template <int F>
void matmul_f(const Lin& L, const float* x, int64_t B, float* y, bool serial) {
  switch (L.dt) {
    case F32: matmul_t<F, F32>(L, x, B, y, serial); break;
    case F16: matmul_t<F, F16>(L, x, B, y, serial); break;
    case BF16: matmul_t<F, BF16>(L, x, B, y, serial); break;
    default: matmul_t<F, I8>(L, x, B, y, serial); break;
  }
}

// ---------------------------------------------------------------- activation-sparse (transposed) products
// acc[0 .. L.in) += a * (stored row i): one input's weights to every output
template <int F, int D>
inline void axpy_row(const Lin& L, int64_t i, float a, float* acc) {
  const int64_t n = L.in;
  if constexpr (F == CSR) {
    for (int64_t k = L.rp[i]; k < L.rp[i + 1]; ++k) acc[L.c[k]] += a * scalar_at<D>(L.v, k);
    return;
  }
#if defined(__AVX512F__)
  const __m512 av = _mm512_set1_ps(a);
  if constexpr (F == DENSE) {
    const int64_t off = i * n;
    int64_t o = 0;
    for (; o + 16 <= n; o += 16)
      _mm512_storeu_ps(acc + o, _mm512_fmadd_ps(av, load16<D>(L.v, off + o), _mm512_loadu_ps(acc + o)));
    if (o < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - o)) - 1u);
      _mm512_mask_storeu_ps(acc + o, k, _mm512_fmadd_ps(av, load16_tail<D>(L.v, off + o, k), _mm512_maskz_loadu_ps(k, acc + o)));
    }
  } else {
    const uint16_t* m = L.m + i * L.chunks;
    int64_t p = L.rp[i];
    const int64_t full = n / 16;
    int64_t c = 0;
    for (; c < full; ++c) {
      const __mmask16 mk = m[c];
      if (mk) {
        _mm512_storeu_ps(acc + 16 * c, _mm512_fmadd_ps(av, expand16<D>(L.v, p, mk), _mm512_loadu_ps(acc + 16 * c)));
        p += __builtin_popcount(mk);
      }
    }
    if (n % 16) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n % 16)) - 1u);
      const __mmask16 mk = m[c];
      _mm512_mask_storeu_ps(acc + 16 * c, k, _mm512_fmadd_ps(av, expand16<D>(L.v, p, mk), _mm512_maskz_loadu_ps(k, acc + 16 * c)));
    }
  }
#else
  if constexpr (F == DENSE) {
    const int64_t off = i * n;
    for (int64_t o = 0; o < n; ++o) acc[o] += a * scalar_at<D>(L.v, off + o);
  } else {
    const uint16_t* m = L.m + i * L.chunks;
    int64_t p = L.rp[i];
    for (int64_t c = 0; c < L.chunks; ++c) {
      uint32_t mm = m[c];
      while (mm) {
        const int j = __builtin_ctz(mm);
        acc[16 * c + j] += a * scalar_at<D>(L.v, p++);
        mm &= mm - 1;
      }
    }
  }
#endif
}

// four stored rows at once (one load/store of the accumulator per four FMAs): dense and bitmask
template <int F, int D>
inline void axpy_rows4(const Lin& L, const int32_t* idx, const float* a, float* acc) {
#if defined(__AVX512F__)
  if constexpr (F == DENSE) {
    const int64_t n = L.in;
    const int64_t o0 = idx[0] * n, o1 = idx[1] * n, o2 = idx[2] * n, o3 = idx[3] * n;
    const __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]), a2 = _mm512_set1_ps(a[2]), a3 = _mm512_set1_ps(a[3]);
    int64_t o = 0;
    for (; o + 16 <= n; o += 16) {
      __m512 s = _mm512_loadu_ps(acc + o);
      s = _mm512_fmadd_ps(a0, load16<D>(L.v, o0 + o), s);
      s = _mm512_fmadd_ps(a1, load16<D>(L.v, o1 + o), s);
      s = _mm512_fmadd_ps(a2, load16<D>(L.v, o2 + o), s);
      s = _mm512_fmadd_ps(a3, load16<D>(L.v, o3 + o), s);
      _mm512_storeu_ps(acc + o, s);
    }
    if (o < n) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n - o)) - 1u);
      __m512 s = _mm512_maskz_loadu_ps(k, acc + o);
      s = _mm512_fmadd_ps(a0, load16_tail<D>(L.v, o0 + o, k), s);
      s = _mm512_fmadd_ps(a1, load16_tail<D>(L.v, o1 + o, k), s);
      s = _mm512_fmadd_ps(a2, load16_tail<D>(L.v, o2 + o, k), s);
      s = _mm512_fmadd_ps(a3, load16_tail<D>(L.v, o3 + o, k), s);
      _mm512_mask_storeu_ps(acc + o, k, s);
    }
    return;
  } else if constexpr (F == BITMASK) {
    const uint16_t *m0 = L.m + idx[0] * L.chunks, *m1 = L.m + idx[1] * L.chunks, *m2 = L.m + idx[2] * L.chunks,
                   *m3 = L.m + idx[3] * L.chunks;
    int64_t p0 = L.rp[idx[0]], p1 = L.rp[idx[1]], p2 = L.rp[idx[2]], p3 = L.rp[idx[3]];
    const __m512 a0 = _mm512_set1_ps(a[0]), a1 = _mm512_set1_ps(a[1]), a2 = _mm512_set1_ps(a[2]), a3 = _mm512_set1_ps(a[3]);
    const int64_t n = L.in, full = n / 16;
    int64_t c = 0;
    for (; c < full; ++c) {
      __m512 s = _mm512_loadu_ps(acc + 16 * c);
      s = _mm512_fmadd_ps(a0, expand16<D>(L.v, p0, m0[c]), s); p0 += __builtin_popcount(m0[c]);
      s = _mm512_fmadd_ps(a1, expand16<D>(L.v, p1, m1[c]), s); p1 += __builtin_popcount(m1[c]);
      s = _mm512_fmadd_ps(a2, expand16<D>(L.v, p2, m2[c]), s); p2 += __builtin_popcount(m2[c]);
      s = _mm512_fmadd_ps(a3, expand16<D>(L.v, p3, m3[c]), s); p3 += __builtin_popcount(m3[c]);
      _mm512_storeu_ps(acc + 16 * c, s);
    }
    if (n % 16) {
      const __mmask16 k = static_cast<__mmask16>((1u << (n % 16)) - 1u);
      __m512 s = _mm512_maskz_loadu_ps(k, acc + 16 * c);
      s = _mm512_fmadd_ps(a0, expand16<D>(L.v, p0, m0[c]), s);
      s = _mm512_fmadd_ps(a1, expand16<D>(L.v, p1, m1[c]), s);
      s = _mm512_fmadd_ps(a2, expand16<D>(L.v, p2, m2[c]), s);
      s = _mm512_fmadd_ps(a3, expand16<D>(L.v, p3, m3[c]), s);
      _mm512_mask_storeu_ps(acc + 16 * c, k, s);
    }
    return;
  }
#endif
  for (int j = 0; j < 4; ++j) axpy_row<F, D>(L, idx[j], a[j], acc);
}

#if defined(__AVX512F__)
#ifndef ST_PF_ROW_HEAD
#define ST_PF_ROW_HEAD 256
#endif
#ifndef ST_PF_GATHER_AHEAD
#define ST_PF_GATHER_AHEAD 512
#endif
// the first ST_PF_ROW_HEAD bytes of each of n stored rows (values; bitmask: and masks): issued
// one group of eight rows ahead, so each gathered row starts from cache and the hardware
// prefetchers, which need a few misses to see a stream, carry on from there
template <int F, int D>
inline void prefetch_row_heads(const Lin& L, const int32_t* idx, int64_t n) {
  constexpr int64_t VSZ = D == F32 ? 4 : (D == I8 ? 1 : 2);
  const char* vb = static_cast<const char*>(L.v);
  for (int64_t j = 0; j < n; ++j) {
    const int64_t r = idx[j];
    const int64_t start = (F == DENSE ? r * L.in : L.rp[r]) * VSZ;
    const int64_t len = std::min<int64_t>(ST_PF_ROW_HEAD, (F == DENSE ? L.in : L.rp[r + 1] - L.rp[r]) * VSZ);
    for (int64_t q = 0; q < len; q += 64) _mm_prefetch(vb + start + q, _MM_HINT_T0);
    if constexpr (F == BITMASK) _mm_prefetch(reinterpret_cast<const char*>(L.m + r * L.chunks), _MM_HINT_T0);
  }
}

// eight stored rows per pass over the accumulator (dense)
template <int D>
inline void dense_rows8(const Lin& L, const int32_t* idx, const float* a, float* acc) {
  const int64_t n = L.in;
  int64_t off[8];
  __m512 av[8];
  for (int j = 0; j < 8; ++j) { off[j] = idx[j] * n; av[j] = _mm512_set1_ps(a[j]); }
  int64_t o = 0;
  for (; o + 16 <= n; o += 16) {
    __m512 s0 = _mm512_fmadd_ps(av[0], load16<D>(L.v, off[0] + o), _mm512_loadu_ps(acc + o));
    __m512 s1 = _mm512_mul_ps(av[1], load16<D>(L.v, off[1] + o));
    s0 = _mm512_fmadd_ps(av[2], load16<D>(L.v, off[2] + o), s0);
    s1 = _mm512_fmadd_ps(av[3], load16<D>(L.v, off[3] + o), s1);
    s0 = _mm512_fmadd_ps(av[4], load16<D>(L.v, off[4] + o), s0);
    s1 = _mm512_fmadd_ps(av[5], load16<D>(L.v, off[5] + o), s1);
    s0 = _mm512_fmadd_ps(av[6], load16<D>(L.v, off[6] + o), s0);
    s1 = _mm512_fmadd_ps(av[7], load16<D>(L.v, off[7] + o), s1);
    _mm512_storeu_ps(acc + o, _mm512_add_ps(s0, s1));
  }
  if (o < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - o)) - 1u);
    __m512 s0 = _mm512_maskz_loadu_ps(k, acc + o);
    for (int j = 0; j < 8; ++j) s0 = _mm512_fmadd_ps(av[j], load16_tail<D>(L.v, off[j] + o, k), s0);
    _mm512_mask_storeu_ps(acc + o, k, s0);
  }
}

// eight stored rows per pass over the accumulator (bitmask: each row's packed values expanded;
// REG: the register form of the expand, when every row can read 16 values past its last one)
template <int D, bool REG>
inline void bitmask_rows8(const Lin& L, const int32_t* idx, const float* a, float* acc) {
  const uint16_t* m[8];
  int64_t p[8];
  __m512 av[8];
  for (int j = 0; j < 8; ++j) { m[j] = L.m + idx[j] * L.chunks; p[j] = L.rp[idx[j]]; av[j] = _mm512_set1_ps(a[j]); }
  const int64_t n = L.in, full = n / 16;
  constexpr int64_t VSZ = D == F32 ? 4 : (D == I8 ? 1 : 2);
  const char* vb = static_cast<const char*>(L.v);
  int64_t c = 0;
  for (; c < full; ++c) {
    // software prefetch along each of the eight gathered rows (values every other chunk, masks
    // every 32): rows of a few hundred bytes to a few KB end before the hardware prefetchers
    // ramp up; measured on SmolLM2's fp16 gate/up at 40% zeros: 3.8 -> 3.1 ms over 30 layers
    if ((c & 1) == 0) {
      for (int j = 0; j < 8; ++j) _mm_prefetch(vb + p[j] * VSZ + ST_PF_GATHER_AHEAD, _MM_HINT_T0);
      if ((c & 31) == 0)
        for (int j = 0; j < 8; ++j) _mm_prefetch(reinterpret_cast<const char*>(m[j] + c) + 64, _MM_HINT_T0);
    }
    __m512 s0 = _mm512_loadu_ps(acc + 16 * c), s1 = _mm512_setzero_ps();
    for (int j = 0; j < 8; j += 2) {
      const __mmask16 k0 = m[j][c], k1 = m[j + 1][c];
      s0 = _mm512_fmadd_ps(av[j], expand16x<D, REG>(L.v, p[j], k0), s0); p[j] += __builtin_popcount(k0);
      s1 = _mm512_fmadd_ps(av[j + 1], expand16x<D, REG>(L.v, p[j + 1], k1), s1); p[j + 1] += __builtin_popcount(k1);
    }
    _mm512_storeu_ps(acc + 16 * c, _mm512_add_ps(s0, s1));
  }
  if (n % 16) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n % 16)) - 1u);
    __m512 s0 = _mm512_maskz_loadu_ps(k, acc + 16 * c);
    for (int j = 0; j < 8; ++j) s0 = _mm512_fmadd_ps(av[j], expand16<D>(L.v, p[j], m[j][c]), s0);
    _mm512_mask_storeu_ps(acc + 16 * c, k, s0);
  }
}
#endif

// x with the entries below the threshold zeroed (TEAL: keep |x_i| >= thr)
void threshold_copy(const Lin& L, const float* x, int64_t B, std::vector<float>& buf) {
  buf.resize(B * L.li);
  const float t = L.thr;
  for (int64_t k = 0; k < B * L.li; ++k) buf[k] = std::fabs(x[k]) >= t ? x[k] : 0.0f;
}

// y = W x for W stored transposed: at one input row only the stored rows of live inputs are read
// (one per non-zero input at or above the threshold), split across threads by input, each thread
// adding into its own accumulator row; several input rows (prefill) decode W^T once and use mm.
template <int F, int D>
void matmul_trans(const Lin& L, const float* x, int64_t B, float* y, bool serial, bool thr) {
  const int64_t lo = L.lo, li = L.li;
  if (B == 1) {
    // scratch kept per calling thread: no allocation per product on the decode hot path
    static thread_local std::vector<int32_t> live;
    static thread_local std::vector<float> xl, accs;
    live.clear(); xl.clear();
    live.reserve(li); xl.reserve(li);
    const float t = thr ? L.thr : -1.0f;  // without the threshold: every non-zero input is live
    for (int64_t i = 0; i < li; ++i) {
      const float a = x[i];
      if (a != 0.0f && std::fabs(a) >= t) { live.push_back(static_cast<int32_t>(i)); xl.push_back(a); }
    }
    const int64_t n = static_cast<int64_t>(live.size());
    const int64_t nt = at::get_num_threads();
    const int64_t per_row = F == DENSE ? lo : std::max<int64_t>(1, L.rp[L.out] / std::max<int64_t>(L.out, 1));
    const bool one = serial || nt <= 1 || at::in_parallel_region() || n * per_row < 32768;
    const int64_t parts = one ? 1 : std::min<int64_t>(nt, n);
    accs.assign(std::max<int64_t>(parts, 1) * lo, 0.0f);
    float* ap = accs.data();
    const int32_t* lv = live.data();
    const float* xv = xl.data();
    auto part = [&, ap, lv, xv](int64_t q) {
      float* acc = ap + q * lo;
      const int64_t k0 = n * q / parts, k1 = n * (q + 1) / parts;
      int64_t k = k0;
#if defined(__AVX512F__)
      if constexpr (F == DENSE || F == BITMASK) prefetch_row_heads<F, D>(L, lv + k, std::min<int64_t>(8, k1 - k));
      if constexpr (F == DENSE) {  // eight rows per pass: measured 1.2-1.5x faster than four on SmolLM2 shapes
        for (; k + 8 <= k1; k += 8) {
          prefetch_row_heads<F, D>(L, lv + k + 8, std::min<int64_t>(8, std::max<int64_t>(0, k1 - k - 8)));
          dense_rows8<D>(L, lv + k, xv + k, acc);
        }
      } else if constexpr (F == BITMASK) {
        for (; k + 8 <= k1; k += 8) {
          prefetch_row_heads<F, D>(L, lv + k + 8, std::min<int64_t>(8, std::max<int64_t>(0, k1 - k - 8)));
          // live inputs ascend: the last of the eight is the one nearest the end of the values
          if (L.rp[lv[k + 7] + 1] + 16 <= L.rp[L.out]) bitmask_rows8<D, true>(L, lv + k, xv + k, acc);
          else bitmask_rows8<D, false>(L, lv + k, xv + k, acc);
        }
      }
#endif
      for (; k + 4 <= k1; k += 4) axpy_rows4<F, D>(L, lv + k, xv + k, acc);
      for (; k < k1; ++k) axpy_row<F, D>(L, lv[k], xv[k], acc);
    };
    if (parts <= 1) part(0); else pool_run(nt, parts, part);
    for (int64_t o = 0; o < lo; ++o) {
      float s = ap[o];
      for (int64_t q = 1; q < parts; ++q) s += ap[q * lo + o];
      if constexpr (D == I8) s *= L.s[o];
      y[o] = s + (L.b ? L.b[o] : 0.0f);
    }
    return;
  }
  torch::Tensor W;
  if constexpr (F == DENSE && D == F32) {
    W = torch::from_blob(const_cast<void*>(L.v), {li, lo}, torch::kFloat32);
  } else {
    W = torch::empty({li, lo}, torch::kFloat32);
    float* wp = W.data_ptr<float>();
    at::parallel_for(0, li, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) decode_row<F, D>(L, r, wp + r * lo);
    });
  }
  std::vector<float> xt;
  const float* xs = x;
  if (thr && L.thr >= 0.0f) { threshold_copy(L, x, B, xt); xs = xt.data(); }
  auto X = torch::from_blob(const_cast<float*>(xs), {B, li}, torch::kFloat32);
  auto Y = torch::from_blob(y, {B, lo}, torch::kFloat32);
  at::mm_out(Y, X, W);
  if constexpr (D == I8) Y.mul_(torch::from_blob(const_cast<float*>(L.s), {lo}, torch::kFloat32));
  if (L.b) Y.add_(torch::from_blob(const_cast<float*>(L.b), {lo}, torch::kFloat32));
}

template <int F>
void matmul_trans_f(const Lin& L, const float* x, int64_t B, float* y, bool serial, bool thr) {
  switch (L.dt) {
    case F32: matmul_trans<F, F32>(L, x, B, y, serial, thr); break;
    case F16: matmul_trans<F, F16>(L, x, B, y, serial, thr); break;
    case BF16: matmul_trans<F, BF16>(L, x, B, y, serial, thr); break;
    default: matmul_trans<F, I8>(L, x, B, y, serial, thr); break;
  }
}

// thr=false: the activation threshold (if any) is not applied (a dense prompt)
void lin_matmul(const Lin& L, const float* x, int64_t B, float* y, bool serial = false, bool thr = true) {
  if (L.trans) {
    switch (L.fmt) {
      case DENSE: matmul_trans_f<DENSE>(L, x, B, y, serial, thr); break;
      case BITMASK: matmul_trans_f<BITMASK>(L, x, B, y, serial, thr); break;
      default: matmul_trans_f<CSR>(L, x, B, y, serial, thr); break;
    }
    return;
  }
  std::vector<float> xt;
  if (thr && L.thr >= 0.0f) { threshold_copy(L, x, B, xt); x = xt.data(); }
  switch (L.fmt) {
    case DENSE: matmul_f<DENSE>(L, x, B, y, serial); break;
    case BITMASK: matmul_f<BITMASK>(L, x, B, y, serial); break;
    default: matmul_f<CSR>(L, x, B, y, serial); break;
  }
}

// one row of a dense weight as fp32 times its scale (embedding lookup)
void lin_row(const Lin& L, int64_t r, float* out) {
  TORCH_CHECK(L.fmt == DENSE && !L.trans, "embedding must be dense");
  TORCH_CHECK(r >= 0 && r < L.out, "token id ", r, " out of range [0, ", L.out, ")");
  switch (L.dt) {
    case F32: decode_row<DENSE, F32>(L, r, out); break;
    case F16: decode_row<DENSE, F16>(L, r, out); break;
    case BF16: decode_row<DENSE, BF16>(L, r, out); break;
    default: {
      decode_row<DENSE, I8>(L, r, out);
      const float sc = L.s[r];
      for (int64_t i = 0; i < L.in; ++i) out[i] *= sc;
    }
  }
}

int64_t lin_nbytes(const Lin& L) {
  int64_t n = L.values.numel() * dt_size(L.dt);
  if (L.masks.defined()) n += L.masks.numel() * 2;
  if (L.cols.defined()) n += L.cols.numel() * 2;
  if (L.row_ptr.defined()) n += L.row_ptr.numel() * 8;
  if (L.scales.defined()) n += L.scales.numel() * 4;
  if (L.bias.defined()) n += L.bias.numel() * 4;
  return n;
}

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

// ---------------------------------------------------------------- standalone product (tests, SparseLinear)
torch::Tensor lowbit_matmul(torch::Tensor x, int64_t fmt, int64_t dt, int64_t out, torch::Tensor values,
                            torch::Tensor masks, torch::Tensor cols, torch::Tensor row_ptr, torch::Tensor scales,
                            c10::optional<torch::Tensor> bias, bool serial, bool check, bool trans, double threshold) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(),
              "x must be a contiguous 2-D float32 CPU tensor");
  torch::Tensor b = bias.has_value() ? *bias : torch::Tensor();
  Lin L = make_lin(fmt, dt, out, x.size(1), values, masks, cols, row_ptr, scales, b, check, trans, threshold);
  auto y = torch::empty({x.size(0), out}, x.options());
  if (x.size(0) > 0) lin_matmul(L, x.data_ptr<float>(), x.size(0), y.data_ptr<float>(), serial);
  return y;
}

// ---------------------------------------------------------------- the decoder
struct Engine {
  int64_t n_layers, hidden, n_heads, n_kv, head_dim, vocab, inter;
  double eps;
  Lin embed, head;
  std::vector<Lin> qkv, o, gu, down;
  std::vector<torch::Tensor> ln1, ln2;
  torch::Tensor final_norm, cos_t, sin_t, kcache, vcache;
  int64_t max_len = 0;
  bool profile = false;
  double t_linear = 0.0, t_attn = 0.0, t_total = 0.0;
  int64_t calls = 0;

  // tensors: [embed x7, head x7, final_norm, then per layer: ln1, ln2, qkv x7, o x7, gu x7, down x7]
  //          (per Lin: values, masks, cols, row_ptr, scales, bias, threshold: float32 [1] or empty)
  // ints: [n_layers, hidden, n_heads, n_kv, head_dim, vocab, inter, then per Lin (embed, head, per layer
  //        qkv, o, gu, down): fmt, dt, out, in, transposed]
  Engine(std::vector<torch::Tensor> t, std::vector<int64_t> meta, double eps_) : eps(eps_) {
    n_layers = meta[0]; hidden = meta[1]; n_heads = meta[2]; n_kv = meta[3]; head_dim = meta[4];
    vocab = meta[5]; inter = meta[6];
    TORCH_CHECK(n_heads % n_kv == 0, "n_heads must be a multiple of n_kv_heads");
    TORCH_CHECK(head_dim % 2 == 0, "head_dim must be even");
    size_t ti = 0, mi = 7;
    auto next_lin = [&]() {
      const int64_t fmt = meta[mi], dt = meta[mi + 1], out = meta[mi + 2], in = meta[mi + 3];
      const bool trans = meta[mi + 4] != 0;
      mi += 5;
      const torch::Tensor& th = t[ti + 6];
      TORCH_CHECK(!th.defined() || th.numel() == 0 || (th.numel() == 1 && th.scalar_type() == torch::kFloat32),
                  "a threshold must be one float32 value");
      const double thr = defined_nonempty(th) ? static_cast<double>(th.item<float>()) : -1.0;
      Lin L = make_lin(fmt, dt, out, in, t[ti], t[ti + 1], t[ti + 2], t[ti + 3], t[ti + 4], t[ti + 5], true, trans, thr);
      ti += 7;
      return L;
    };
    embed = next_lin();
    TORCH_CHECK(embed.lo == vocab && embed.li == hidden && !embed.trans, "embedding shape mismatch");
    head = next_lin();
    TORCH_CHECK(head.lo == vocab && head.li == hidden, "head shape mismatch");
    final_norm = t[ti++];
    const int64_t qkv_out = (n_heads + 2 * n_kv) * head_dim;
    for (int64_t l = 0; l < n_layers; ++l) {
      ln1.push_back(t[ti++]); ln2.push_back(t[ti++]);
      TORCH_CHECK(ln1.back().numel() == hidden && ln2.back().numel() == hidden &&
                  ln1.back().scalar_type() == torch::kFloat32 && ln2.back().scalar_type() == torch::kFloat32,
                  "norm weights must be float32 of length hidden");
      qkv.push_back(next_lin()); o.push_back(next_lin()); gu.push_back(next_lin()); down.push_back(next_lin());
      TORCH_CHECK(qkv.back().lo == qkv_out && qkv.back().li == hidden, "qkv shape mismatch in layer ", l);
      TORCH_CHECK(o.back().lo == hidden && o.back().li == n_heads * head_dim, "o_proj shape mismatch in layer ", l);
      TORCH_CHECK(gu.back().lo == 2 * inter && gu.back().li == hidden, "gate/up shape mismatch in layer ", l);
      TORCH_CHECK(down.back().lo == hidden && down.back().li == inter, "down_proj shape mismatch in layer ", l);
    }
    TORCH_CHECK(ti == t.size() && mi == meta.size(), "engine: unexpected number of tensors or ints");
  }

  // RoPE tables [max_len, head_dim] (cos, sin); allocates the KV cache for max_len positions
  void reset(torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK(cos.dim() == 2 && cos.size(1) == head_dim && cos.scalar_type() == torch::kFloat32 && cos.is_contiguous()
                && sin.sizes() == cos.sizes() && sin.scalar_type() == torch::kFloat32 && sin.is_contiguous(),
                "rope tables must be contiguous float32 [max_len, head_dim]");
    cos_t = cos; sin_t = sin; max_len = cos.size(0);
    kcache = torch::zeros({n_layers, n_kv, max_len, head_dim}, torch::kFloat32);
    vcache = torch::zeros({n_layers, n_kv, max_len, head_dim}, torch::kFloat32);
  }

  void rmsnorm(const float* x, const float* w, float* y, int64_t T) const {
    for (int64_t t = 0; t < T; ++t) {
      const float* xr = x + t * hidden;
      float* yr = y + t * hidden;
      float ss = 0.f;
      for (int64_t i = 0; i < hidden; ++i) ss += xr[i] * xr[i];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + static_cast<float>(eps));
      for (int64_t i = 0; i < hidden; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
  }

  void rope(float* v, int64_t pos) const {
    const float* c = cos_t.data_ptr<float>() + pos * head_dim;
    const float* s = sin_t.data_ptr<float>() + pos * head_dim;
    const int64_t h2 = head_dim / 2;
    for (int64_t i = 0; i < h2; ++i) {
      const float a = v[i], b = v[i + h2];
      v[i] = a * c[i] - b * s[i];
      v[i + h2] = b * c[i + h2] + a * s[i + h2];
    }
  }

  // logits [T or 1, vocab] for tokens ids[T] at positions pos0 .. pos0+T-1; thresholds=false runs
  // these tokens without the activation thresholds (a dense prompt)
  torch::Tensor forward(torch::Tensor ids, int64_t pos0, bool all_logits, bool thresholds) {
    TORCH_CHECK(max_len > 0, "call reset() before forward()");
    TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kInt64 && ids.is_contiguous(), "ids must be 1-D int64");
    const int64_t T = ids.size(0);
    TORCH_CHECK(T >= 1, "forward needs at least one token");
    TORCH_CHECK(pos0 >= 0 && pos0 + T <= max_len, "positions ", pos0, "..", pos0 + T - 1,
                " exceed the KV cache of ", max_len, " positions; reset with longer tables");
    const double t_start = profile ? now_s() : 0.0;
    const int64_t* idp = ids.data_ptr<int64_t>();
    const int64_t qkv_out = (n_heads + 2 * n_kv) * head_dim, qd = n_heads * head_dim, kd = n_kv * head_dim;
    std::vector<float> x(T * hidden), h(T * hidden), qkvb(T * qkv_out), att(T * qd), tmp(T * hidden),
        gub(T * 2 * inter), act(T * inter);
    for (int64_t t = 0; t < T; ++t) lin_row(embed, idp[t], x.data() + t * hidden);
    const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
    const int64_t group = n_heads / n_kv;
    float* kc = kcache.data_ptr<float>();
    float* vc = vcache.data_ptr<float>();
    auto timed_mm = [&](const Lin& L, const float* in, float* out_, int64_t B) {
      if (profile) { const double a = now_s(); lin_matmul(L, in, B, out_, false, thresholds); t_linear += now_s() - a; }
      else lin_matmul(L, in, B, out_, false, thresholds);
    };
    for (int64_t l = 0; l < n_layers; ++l) {
      rmsnorm(x.data(), ln1[l].data_ptr<float>(), h.data(), T);
      timed_mm(qkv[l], h.data(), qkvb.data(), T);
      const double ta = profile ? now_s() : 0.0;
      float* kl = kc + l * n_kv * max_len * head_dim;
      float* vl = vc + l * n_kv * max_len * head_dim;
      for (int64_t t = 0; t < T; ++t) {
        float* row = qkvb.data() + t * qkv_out;
        const int64_t pos = pos0 + t;
        for (int64_t hh = 0; hh < n_heads; ++hh) rope(row + hh * head_dim, pos);
        for (int64_t g = 0; g < n_kv; ++g) {
          float* k = row + qd + g * head_dim;
          rope(k, pos);
          std::memcpy(kl + (g * max_len + pos) * head_dim, k, head_dim * sizeof(float));
          std::memcpy(vl + (g * max_len + pos) * head_dim, row + qd + kd + g * head_dim, head_dim * sizeof(float));
        }
      }
      auto attend = [&](int64_t w0, int64_t w1) {
        std::vector<float> sc(max_len);
        for (int64_t w = w0; w < w1; ++w) {
          const int64_t t = w / n_heads, hh = w % n_heads, g = hh / group, n = pos0 + t + 1;
          const float* q = qkvb.data() + t * qkv_out + hh * head_dim;
          const float* kb = kl + g * max_len * head_dim;
          const float* vb = vl + g * max_len * head_dim;
          float mx = -INFINITY;
          for (int64_t j = 0; j < n; ++j) {
            sc[j] = dot_f32(q, kb + j * head_dim, head_dim) * scale;
            mx = std::max(mx, sc[j]);
          }
          float sum = 0.f;
          for (int64_t j = 0; j < n; ++j) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
          const float inv = 1.0f / sum;
          float* o_ = att.data() + t * qd + hh * head_dim;
          std::fill(o_, o_ + head_dim, 0.0f);
          for (int64_t j = 0; j < n; ++j) {
            const float p = sc[j] * inv;
            const float* vr = vb + j * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) o_[d] += p * vr[d];
          }
        }
      };
      const int64_t items = T * n_heads;
      if (T * (pos0 + T) * head_dim * n_heads > 65536 && at::get_num_threads() > 1) at::parallel_for(0, items, 1, attend);
      else attend(0, items);
      if (profile) t_attn += now_s() - ta;
      timed_mm(o[l], att.data(), tmp.data(), T);
      for (int64_t i = 0; i < T * hidden; ++i) x[i] += tmp[i];
      rmsnorm(x.data(), ln2[l].data_ptr<float>(), h.data(), T);
      timed_mm(gu[l], h.data(), gub.data(), T);
      for (int64_t t = 0; t < T; ++t) {
        const float* g_ = gub.data() + t * 2 * inter;
        const float* u_ = g_ + inter;
        float* a_ = act.data() + t * inter;
        for (int64_t i = 0; i < inter; ++i) a_[i] = (g_[i] / (1.0f + std::exp(-g_[i]))) * u_[i];
      }
      timed_mm(down[l], act.data(), tmp.data(), T);
      for (int64_t i = 0; i < T * hidden; ++i) x[i] += tmp[i];
    }
    const int64_t first = all_logits ? 0 : T - 1, rows = T - first;
    rmsnorm(x.data() + first * hidden, final_norm.data_ptr<float>(), h.data(), rows);
    auto logits = torch::empty({rows, vocab}, torch::kFloat32);
    timed_mm(head, h.data(), logits.data_ptr<float>(), rows);
    if (profile) { t_total += now_s() - t_start; calls += 1; }
    return logits;
  }

  // bytes of weights read by one decode step (one token): every matrix once, one embedding row
  int64_t weight_bytes_per_token() const {
    int64_t n = lin_nbytes(head) + embed.in * dt_size(embed.dt);
    for (int64_t l = 0; l < n_layers; ++l) n += lin_nbytes(qkv[l]) + lin_nbytes(o[l]) + lin_nbytes(gu[l]) + lin_nbytes(down[l]);
    n += (2 * n_layers + 1) * hidden * 4;
    return n;
  }

  std::vector<double> stats() const { return {t_total, t_linear, t_attn, static_cast<double>(calls)}; }
  void set_profile(bool on) { profile = on; t_linear = t_attn = t_total = 0.0; calls = 0; }
};

bool has_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

bool has_expand() {
#if defined(ST_HAVE_EXPAND)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowbit_matmul", &lowbit_matmul, "y = x @ W.T (* scale) + b for a dense/bitmask/csr weight in fp32/fp16/bf16/int8",
        py::arg("x"), py::arg("fmt"), py::arg("dt"), py::arg("out"), py::arg("values"), py::arg("masks"),
        py::arg("cols"), py::arg("row_ptr"), py::arg("scales"), py::arg("bias"), py::arg("serial") = false, py::arg("check") = true,
        py::arg("trans") = false, py::arg("threshold") = -1.0);
  m.def("has_avx512", &has_avx512);
  m.def("has_expand", &has_expand);
  py::class_<Engine>(m, "Engine")
      .def(py::init<std::vector<torch::Tensor>, std::vector<int64_t>, double>())
      .def("reset", &Engine::reset)
      .def("forward", &Engine::forward, py::arg("ids"), py::arg("pos0"), py::arg("all_logits"),
           py::arg("thresholds") = true, py::call_guard<py::gil_scoped_release>())
      .def("weight_bytes_per_token", &Engine::weight_bytes_per_token)
      .def("stats", &Engine::stats)
      .def("set_profile", &Engine::set_profile)
      .def_readonly("max_len", &Engine::max_len);
}
"""
