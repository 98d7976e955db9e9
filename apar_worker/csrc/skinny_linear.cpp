// Float32 linear layers for the few rows of a decode step, for CPU (apar_worker/native.py).
//
// A decode or verify step multiplies 1-64 rows by every weight matrix once: the cost is the
// weight read, as on a GPU, if each weight is read from memory once per step whatever the
// row count. The weight is stored once, at load time, as panels of 16 output columns laid
// out k-major ([N/16, K, 16]), so a panel streams sequentially from memory; each panel is then
// multiplied with blocks of up to 6 (AVX2) or 16 (AVX-512F) rows held in registers, re-read
// from cache (not memory) for the next block. Panels are split over the torch threads
// (spin_pool.h). Plain GEMM libraries re-pack
// the weights per call or switch algorithm with the row count; this costs the same weight
// read at 1 row as at 16.
#include <torch/extension.h>
#include "ops.h"
#include "spin_pool.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t P = 16;  // output columns per panel
// rows per register block: AVX-512 holds a panel row in one register (16 accumulators + the
// weight vector of 32), AVX2 in two (12 accumulators + 2 weight vectors of 16)
#if defined(__AVX512F__)
constexpr int MB = 16;
#else
constexpr int MB = 6;
#endif

// a cache line of the next panel, asked for into L2 while this one computes: the hardware
// prefetcher alone left a 16-row fp32 product at 229 us for 1536 x 576 where int8 (a quarter of
// the bytes) took 112 us (2 vCPUs, AVX-512); into L1 it evicted the rows the block broadcasts
inline void prefetch(const void* at) {
#if defined(__AVX2__) || defined(__AVX512F__)
  _mm_prefetch(static_cast<const char*>(at), _MM_HINT_T1);
#else
  (void)at;
#endif
}

// y = acc * scale + bias per column; scale is int8's per-channel factor (nullptr: float weights).
// One explicit fused multiply-add: left to -ffp-contract, each row count's inlined copy could
// round it its own way, and a row's result would depend on its step's rows
template <int R>
inline void store(const float* acc, float* y, int64_t ldy, int64_t cols, const float* scale,
                  const float* bias) {
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c)
      y[r * ldy + c] = std::fma(acc[r * P + c], scale ? scale[c] : 1.0f, bias ? bias[c] : 0.0f);
}

// A block multiplies R rows with C consecutive panels (they lie k_dim * P apart), so a step of
// 1-4 rows keeps C * R fused multiply-add chains in flight instead of R: one chain per panel
// waits ~4 cycles a k, which held a 1-row int8 product at twice its weight read. Each column
// still sums its k in order in one chain: the same floats whatever C or the step's rows.
#if defined(__AVX512F__)
constexpr int group_for(int64_t rows) { return rows <= 4 ? 4 : rows <= 8 ? 2 : 1; }  // <= 16 accumulators

inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }

// 16 int8 weights widened to floats in a register: exact (|q| <= 127), one 16-byte load
inline __m512 load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}

// Per lane the same fused multiply-adds in the same k order as the AVX2 block: same floats.
template <typename W, int R, int C>
inline void block(const float* x, const W* w, int64_t k_dim, float* y, int64_t ldy,
                  int64_t cols, const float* scale, const float* bias, const W* pf) {
  __m512 acc[C][R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[c][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    if (pf && (k * P * sizeof(W)) % 64 == 0)
      for (int c = 0; c < C; ++c) prefetch(pf + c * k_dim * P + k * P);
    __m512 wv[C];
    for (int c = 0; c < C; ++c) wv[c] = load16(w + c * k_dim * P + k * P);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 xb = _mm512_set1_ps(x[k * R + r]);
      for (int c = 0; c < C; ++c) acc[c][r] = _mm512_fmadd_ps(wv[c], xb, acc[c][r]);
    }
  }
  alignas(64) float out[R * P];
  for (int c = 0; c < C; ++c) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) _mm512_store_ps(out + r * P, acc[c][r]);
    store<R>(out, y + c * P, ldy, c + 1 < C ? P : cols, scale ? scale + c * P : nullptr, bias ? bias + c * P : nullptr);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int group_for(int64_t rows) { return rows <= 2 ? 2 : 1; }  // <= 8 accumulators of 16

inline void load16(const float* w, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(w);
  w1 = _mm256_loadu_ps(w + 8);
}

// 16 int8 weights widened to floats in registers: exact (|q| <= 127), one 16-byte load
inline void load16(const int8_t* w, __m256& w0, __m256& w1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
}

template <typename W, int R, int C>
inline void block(const float* x, const W* w, int64_t k_dim, float* y, int64_t ldy,
                  int64_t cols, const float* scale, const float* bias, const W* pf) {
  __m256 lo[C][R], hi[C][R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) lo[c][r] = hi[c][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    if (pf && (k * P * sizeof(W)) % 64 == 0)
      for (int c = 0; c < C; ++c) prefetch(pf + c * k_dim * P + k * P);
    __m256 w0[C], w1[C];
    for (int c = 0; c < C; ++c) load16(w + c * k_dim * P + k * P, w0[c], w1[c]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + k * R + r);
      for (int c = 0; c < C; ++c) {
        lo[c][r] = _mm256_fmadd_ps(w0[c], xb, lo[c][r]);
        hi[c][r] = _mm256_fmadd_ps(w1[c], xb, hi[c][r]);
      }
    }
  }
  alignas(32) float acc[R * P];
  for (int c = 0; c < C; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      _mm256_store_ps(acc + r * P, lo[c][r]);
      _mm256_store_ps(acc + r * P + 8, hi[c][r]);
    }
    store<R>(acc, y + c * P, ldy, c + 1 < C ? P : cols, scale ? scale + c * P : nullptr, bias ? bias + c * P : nullptr);
  }
}
#else  // portable: the same loop order, vectorised by the compiler where it can
constexpr int group_for(int64_t) { return 1; }

template <typename W, int R, int C>
inline void block(const float* x, const W* w, int64_t k_dim, float* y, int64_t ldy,
                  int64_t cols, const float* scale, const float* bias, const W* pf) {
  (void)pf;
  static_assert(C == 1, "the portable block takes one panel");
  float acc[R * P] = {};
  for (int64_t k = 0; k < k_dim; ++k)
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < P; ++c) acc[r * P + c] += static_cast<float>(w[k * P + c]) * x[k * R + r];
  store<R>(acc, y, ldy, cols, scale, bias);
}
#endif

// block<W, rows, C> for a run-time row count in [1, MB] over `group` consecutive panels: one
// block of group_for(rows) panels where that is the group, else one panel at a time
template <typename W, int R = 1>
inline void block_of(int64_t rows, int group, const float* x, const W* w, int64_t k_dim, float* y,
                     int64_t ldy, int64_t cols, const float* scale, const float* bias, const W* pf) {
  if constexpr (R < MB) {
    if (rows > R) return block_of<W, R + 1>(rows, group, x, w, k_dim, y, ldy, cols, scale, bias, pf);
  }
  constexpr int G = group_for(R);
  if (G > 1 && group == G) return block<W, R, G>(x, w, k_dim, y, ldy, cols, scale, bias, pf);
  for (int c = 0; c < group; ++c) {
    const int64_t off = c * k_dim * P;
    block<W, R, 1>(x, w + off, k_dim, y + c * P, ldy, c + 1 < group ? P : cols, scale ? scale + c * P : nullptr,
                   bias ? bias + c * P : nullptr, pf ? pf + off : nullptr);
  }
}

// f(m0, rows) for each block of rows: m_dim split evenly over the fewest blocks of at most MB
// (AVX2, 16 rows: 6 + 5 + 5, not 6 + 6 + 4): a block of R rows keeps R (AVX-512) or 2R (AVX2)
// FMA chains in flight, and fewer than ~8-10 leave the FMA units idle
template <typename F>
inline void for_row_blocks(int64_t m_dim, const F& f) {
  const int64_t blocks = (m_dim + MB - 1) / MB;
  for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
    const int64_t rows = (m_dim - m0) / (blocks - b);
    f(b, m0, rows);
    m0 += rows;
  }
}

// x [M, K] -> each row block k-major ([K, rows], at row m0 * K): a block's broadcasts for one k
// then share a cache line, where 16 rows K floats apart spill L1 from K ~ 512 on (576 x 1536
// at 16 rows ran at 77 GFLOPS, a third of the FMA peak of 2 Zen 4 cores)
// (into the calling thread's buffer, reused: 64 rows of 1536 floats would map fresh pages a call)
const float* pack_rows(const float* x, int64_t m_dim, int64_t k_dim) {
  thread_local std::vector<float> xt;
  xt.resize(static_cast<size_t>(m_dim * k_dim));
  for_row_blocks(m_dim, [&](int64_t, int64_t m0, int64_t rows) {
    float* dst = xt.data() + m0 * k_dim;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < k_dim; ++k) dst[k * rows + r] = x[(m0 + r) * k_dim + k];
  });
  return xt.data();
}

// `group` consecutive panels (group_for(m_dim) or 1; cols: the last one's columns) times m_dim
// rows packed by pack_rows
template <typename W>
void panel(const float* x, int64_t m_dim, int64_t k_dim, const W* w, float* y, int64_t n_dim, int group,
           int64_t cols, const float* scale, const float* bias, const W* pf) {
  for_row_blocks(m_dim, [&](int64_t b, int64_t m0, int64_t rows) {
    block_of<W>(rows, group, x + m0 * k_dim, w, k_dim, y + m0 * n_dim, n_dim, cols, scale, bias, b == 0 ? pf : nullptr);
  });
}

// int8 panels: one register block widens the weights as it goes; several blocks would widen
// them once each, so the panel is widened once into a per-thread float buffer (cache, not
// memory) and multiplied as a float panel. Both give the same floats in the same order.
void panel_int8(const float* x, int64_t m_dim, int64_t k_dim, const int8_t* w, float* y, int64_t n_dim,
                int group, int64_t cols, const float* scale, const float* bias, const int8_t* pf) {
  if (m_dim <= MB) return panel<int8_t>(x, m_dim, k_dim, w, y, n_dim, group, cols, scale, bias, pf);
  thread_local std::vector<float> wide;
  wide.resize(static_cast<size_t>(k_dim * P));
  for (int64_t i0 = 0; i0 < k_dim * P; i0 += 64) {  // a cache line at a time (k_dim * P: 16s)
    if (pf) prefetch(pf + i0);
    const int64_t i1 = std::min(k_dim * P, i0 + 64);
    for (int64_t i = i0; i < i1; ++i) wide[i] = static_cast<float>(w[i]);
  }
  panel<float>(x, m_dim, k_dim, wide.data(), y, n_dim, 1, cols, scale, bias, nullptr);  // group: 1 here
}

}  // namespace

// weight [N, K] (float32, or int8 values) -> panels [ceil(N/16), K, 16], zero-padded past N.
at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kChar),
              "pack_panels: float32 or int8 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1), np = (n + P - 1) / P;
  auto padded = at::zeros({np * P, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({np, P, k}).transpose(1, 2).contiguous();
}

// x [M, K] float32 times panels (pack_panels of an [N, K] weight) -> [M, N], plus bias [N].
// int8 panels need scales [N] (w = q * scale per output channel); the rows stay float32.
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "skinny_linear: x must be float32 [M, K]");
  if (panels.scalar_type() == at::kBFloat16) {  // a float32 weight as AMX bf16 hi/lo tiles (amx_linear.cpp)
    TORCH_CHECK(!bias.has_value() || !bias->defined() || (bias->numel() == n && bias->scalar_type() == at::kFloat),
                "skinny_linear: bias must be float32 [N]");
    const auto b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
    return amx_float_linear(x.contiguous(), panels.contiguous(), n, b.defined() ? b.data_ptr<float>() : nullptr);
  }
  const bool int8 = panels.scalar_type() == at::kChar, amx = panels.dim() == 3 && panels.size(2) == 4 * P;
  const bool pairs = int8 && panels.dim() == 3 && panels.size(2) == 2 * P;  // bf16 rows (bf16_rows.cpp)
  TORCH_CHECK(panels.dim() == 3 && (panels.size(2) == P || (int8 && (amx || pairs))) && panels.is_contiguous(),
              "skinny_linear: bad panels");
  TORCH_CHECK((amx || pairs || panels.size(1) == x.size(1)) && panels.size(0) * P >= n,
              "skinny_linear: shapes disagree");
  TORCH_CHECK(int8 || panels.scalar_type() == at::kFloat, "skinny_linear: panels must be float32 or int8");
  auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), np = (n + P - 1) / P;
  at::Tensor b, s;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n && b.scalar_type() == at::kFloat, "skinny_linear: bias must be float32 [N]");
  }
  if (int8) {
    TORCH_CHECK(scales.has_value() && scales->defined(), "skinny_linear: int8 panels need scales");
    s = scales->contiguous();
    TORCH_CHECK(s.numel() == n && s.scalar_type() == at::kFloat, "skinny_linear: scales must be float32 [N]");
  }
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  if (amx) return amx_linear(xc, panels, n, bp, sp);  // int8 as AMX B tiles (amx_linear.cpp)
  if (pairs) return bf16_rows_linear(xc, panels, n, bp, sp);
  const float* xp = pack_rows(xc.data_ptr<float>(), m, k);  // the panel kernels' row layout
  auto out = at::empty({m, n}, xc.options());
  float* yp = out.data_ptr<float>();
  const int want = m <= MB ? group_for(m) : 1;  // panels per register block
  apar::parallel_range(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1;) {
      const int g = p + want <= p1 ? want : 1;  // the thread's last few panels one at a time
      const int64_t cols = std::min(P, n - (p + g - 1) * P), off = p * P;
      const float* bias_p = bp ? bp + off : nullptr;
      const bool next = p + g < p1;  // this thread's next panels: fetched while these compute
      if (int8) {
        const int8_t* w = panels.data_ptr<int8_t>() + p * k * P;
        panel_int8(xp, m, k, w, yp + off, n, g, cols, sp + off, bias_p, next ? w + g * k * P : nullptr);
      } else {
        const float* w = panels.data_ptr<float>() + p * k * P;
        panel<float>(xp, m, k, w, yp + off, n, g, cols, nullptr, bias_p, next ? w + g * k * P : nullptr);
      }
      p += g;
    }
  });
  return out;
}
