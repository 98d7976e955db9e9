// Int8 linear layers with bfloat16 rows on AVX512_BF16 (AMD Zen 4 on, Intel Cooper Lake on).
//
// skinny_linear.cpp widens int8 weights to float32 and multiplies them with float32 FMAs: from
// a few rows on, a step is bound by those FMAs, not by the weight read (16 rows of SmolLM2:
// ~4 GFLOP). VDPBF16PS does 32 multiply-adds where an FMA does 16, at about the same rate, so
// here each row is rounded to bfloat16 once per call and the int8 weights are widened to
// bfloat16 (exact: |q| <= 127) in registers. Products and sums stay float32. A row keeps 2^-9
// of each value (what torch's own int8 CPU kernel keeps, and where AMX's two int8 levels keep
// 2^-16 of the row's largest). Panels hold 16 output columns with k in pairs
// ([N/16, K/2, 16, 2]: pack_panels_pairs), the operand layout of VDPBF16PS.
//
// Each column sums its k pairs in order in one chain, whatever the rows or panels of its
// register block: a row alone gives the same floats as in a batch.
#include <torch/extension.h>
#include "ops.h"
#include "spin_pool.h"

#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define APAR_BF16_ROWS 1
#endif

namespace {

constexpr int64_t P = 16;  // output columns per panel
constexpr int64_t PAIR = 2 * P;  // int8 weights per k pair of a panel

#if APAR_BF16_ROWS
// float32 -> bfloat16 bits, rounded to nearest even (NaN stays NaN), as VCVTNE2PS2BF16 does
inline uint16_t to_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

constexpr int MB = 16;  // rows per register block (16 accumulators)
constexpr int group_for(int64_t rows) { return rows <= 4 ? 4 : rows <= 8 ? 2 : 1; }

// 32 int8 weights (one k pair of a panel) as bfloat16, exact
inline __m512bh widen(const int8_t* w) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m512 hi =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + P))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}
inline __m512bh widen(const uint16_t* w) { return (__m512bh)_mm512_loadu_si512(w); }  // already bfloat16

// R rows (bf16 pairs, ldx pairs apart) times C panels (pairs * PAIR weights apart)
template <typename W, int R, int C>
inline void block(const uint32_t* x, int64_t ldx, const W* w, int64_t pairs, float* y, int64_t ldy, int64_t cols,
                  const float* scale, const float* bias, const int8_t* pf) {
  __m512 acc[C][R];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[c][r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < pairs; ++j) {
    if (pf && j % 2 == 0)
      for (int c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(pf + (c * pairs + j) * PAIR), _MM_HINT_T0);
    __m512bh wv[C];
    for (int c = 0; c < C; ++c) wv[c] = widen(w + (c * pairs + j) * PAIR);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + j]));
      for (int c = 0; c < C; ++c) acc[c][r] = _mm512_dpbf16_ps(acc[c][r], wv[c], xb);
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t n = c + 1 < C ? P : cols;
    const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scale + c * P);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + c * P) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * ldy + c * P, mask, _mm512_fmadd_ps(acc[c][r], s, b));
  }
}

// block<W, rows, C> for a run-time row count in [1, MB] over `group` panels
template <typename W, int R = 1>
inline void block_of(int64_t rows, int group, const uint32_t* x, int64_t ldx, const W* w, int64_t pairs, float* y,
                     int64_t ldy, int64_t cols, const float* scale, const float* bias, const int8_t* pf) {
  if constexpr (R < MB) {
    if (rows > R) return block_of<W, R + 1>(rows, group, x, ldx, w, pairs, y, ldy, cols, scale, bias, pf);
  }
  constexpr int G = group_for(R);
  if (G > 1 && group == G) return block<W, R, G>(x, ldx, w, pairs, y, ldy, cols, scale, bias, pf);
  for (int c = 0; c < group; ++c) {
    const int64_t off = c * pairs * PAIR;
    block<W, R, 1>(x, ldx, w + off, pairs, y + c * P, ldy, c + 1 < group ? P : cols, scale + c * P,
                   bias ? bias + c * P : nullptr, pf ? pf + off : nullptr);
  }
}

// `group` panels times all m rows: up to MB rows widen the weights in registers; more rows
// widen the panel once into a per-thread bfloat16 buffer (cache) and run blocks over that
void panels_times_rows(const uint32_t* x, int64_t m, int64_t pairs, const int8_t* w, float* y, int64_t n, int group,
                       int64_t cols, const float* scale, const float* bias, const int8_t* pf) {
  if (m <= MB) return block_of<int8_t>(m, group, x, pairs, w, pairs, y, n, cols, scale, bias, pf);
  thread_local std::vector<uint16_t> wide;
  wide.resize(static_cast<size_t>(pairs * PAIR));
  for (int64_t j = 0; j < pairs; ++j) {
    if (pf && j % 2 == 0) _mm_prefetch(reinterpret_cast<const char*>(pf + j * PAIR), _MM_HINT_T0);
    _mm512_storeu_si512(wide.data() + j * PAIR, (__m512i)widen(w + j * PAIR));
  }
  const int64_t blocks = (m + MB - 1) / MB;  // rows split evenly over the fewest blocks
  for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
    const int64_t rows = (m - m0) / (blocks - b);
    block_of<uint16_t>(rows, 1, x + m0 * pairs, pairs, wide.data(), pairs, y + m0 * n, n, cols, scale, bias, nullptr);
    m0 += rows;
  }
}
#endif

}  // namespace

bool bf16_rows_available() {
#if APAR_BF16_ROWS
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

// int8 weight [N, K] -> panels [ceil(N/16), ceil(K/2), 32]: [p, j, 2c + t] = w[16p + c, 2j + t], zero-padded
at::Tensor pack_panels_pairs(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "pack_panels_pairs: int8 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1), np = (n + P - 1) / P, kp = (k + 1) / 2;
  auto padded = at::zeros({np * P, kp * 2}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  return padded.view({np, P, kp, 2}).permute({0, 2, 1, 3}).contiguous().view({np, kp, PAIR});
}

// x [M, K] float32 times pair panels -> [M, N] = bf16(x) @ q.T * scales + bias
at::Tensor bf16_rows_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, const float* bias,
                            const float* scales) {
  TORCH_CHECK(bf16_rows_available(), "bf16 rows: this CPU has no AVX512_BF16 (or the build lacks it)");
  const int64_t m = x.size(0), k = x.size(1), np = panels.size(0), pairs = panels.size(1);
  TORCH_CHECK(pairs == (k + 1) / 2 && np * P >= n, "bf16 rows: shapes disagree");
  auto out = at::empty({m, n}, x.options());
#if APAR_BF16_ROWS
  std::vector<uint32_t> rows(static_cast<size_t>(m * pairs), 0);  // each row as bf16 (x[2j], x[2j+1]) pairs
  auto* half = reinterpret_cast<uint16_t*>(rows.data());
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < k; ++i) half[r * pairs * 2 + i] = to_bf16(xp[r * k + i]);  // little-endian: x[2j] low
  const int8_t* w = panels.data_ptr<int8_t>();
  float* y = out.data_ptr<float>();
  const int want = m <= MB ? group_for(m) : 1;
  apar::parallel_range(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1;) {
      const int g = p + want <= p1 ? want : 1;
      const int64_t cols = std::min(P, n - (p + g - 1) * P), off = p * P;
      const int8_t* wp = w + p * pairs * PAIR;
      const int8_t* pf = p + g < p1 ? wp + g * pairs * PAIR : nullptr;
      panels_times_rows(rows.data(), m, pairs, wp, y + off, n, g, cols, scales + off, bias ? bias + off : nullptr, pf);
      p += g;
    }
  });
#else
  (void)bias, (void)scales;
#endif
  return out;
}
