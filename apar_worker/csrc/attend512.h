// The AVX-512 core of the paged attention kernels (paged_decode.cpp): a few query vectors of
// one KV head over keys read through a block table.
//
// The AVX2 core (paged_decode.cpp) sums each q . k over 8-float pieces and reduces 8 keys with
// horizontal adds; with 16 rows of sibling branches over a 512-token prefix that arithmetic
// was a third of an int8 step. Here a key's dot product is 4 FMAs of 16 floats (head size 64),
// 16 keys are reduced together by a shuffle tree (45 ops for 16 sums), and p . v runs on
// 16-float rows with three query vectors per pass, so each value row is loaded once per three.
#pragma once

#include <c10/util/Exception.h>

#include "vec_math.h"

#include <cstdint>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <immintrin.h>
#endif

namespace apar_attn {

struct Cache {
  const float* k;  // one KV head's [NB, BS, D]
  const float* v;
  int64_t nb, bs, d;
};

constexpr int64_t AHEAD = 16;  // keys ahead whose block's first lines are fetched early

// The first lines of a block: hardware prefetchers stop at 4 KB pages, so every block (one
// page per KV head with 16 keys of 64 floats) would start on cold misses.
inline void lead(const float* at) {
#if defined(__SSE__) || defined(__x86_64__)
  for (int x = 0; x < 4; ++x) _mm_prefetch(reinterpret_cast<const char*>(at) + 64 * x, _MM_HINT_T0);
#else
  (void)at;
#endif
}

}  // namespace apar_attn

#if defined(__AVX512F__)
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace apar_attn {

constexpr int64_t CHUNK = 64;  // keys per chunk: a chunk's K or V (64 x D floats) stays in L1

// 16 vectors of partial sums -> one vector of their 16 totals (a[j]'s total in lane j)
inline __m512 reduce16(__m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0x44), _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], 0xEE));
  // c[i]'s 128-bit lane L: keys 4i..4i+3, summed over lane L of the inputs; add the four lanes
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// scores[t] = sc * q . k[t] for 16 keys (D16 * 16 floats each)
template <int D16>
inline __m512 dot16(const __m512* q, const float* k, const int64_t* off) {
  __m512 a[16];
  for (int j = 0; j < 16; ++j) {
    const float* kj = k + off[j];
    a[j] = _mm512_mul_ps(q[0], _mm512_loadu_ps(kj));
    for (int c = 1; c < D16; ++c) a[j] = _mm512_fmadd_ps(q[c], _mm512_loadu_ps(kj + 16 * c), a[j]);
  }
  return reduce16(a);
}

// e^x for x <= 0: exp8's steps (vec_math.h) on 16 lanes
inline __m512 exp16(__m512 x) {
  using namespace apar_exp;
  x = _mm512_max_ps(x, _mm512_set1_ps(LOWEST));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_HI), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(LN2_LO), x);
  __m512 y = _mm512_set1_ps(POLY[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(POLY[i]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

// R query vectors' p . v over keys [t0, t1) into their accumulators (D16 vectors each)
template <int D16, int R>
inline void pv(const float* const* p, float* const* acc, const float* v, const int64_t* off, int64_t t0, int64_t t1,
               int64_t len, int64_t bs) {
  __m512 a[R][D16];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D16; ++c) a[r][c] = _mm512_loadu_ps(acc[r] + 16 * c);
  for (int64_t t = t0; t < t1; ++t) {
    if (t % bs == 0 && t + AHEAD < len) lead(v + off[t + AHEAD]);
    const float* vv = v + off[t];
    __m512 row[D16];
    for (int c = 0; c < D16; ++c) row[c] = _mm512_loadu_ps(vv + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r][t]);
      for (int c = 0; c < D16; ++c) a[r][c] = _mm512_fmadd_ps(pr, row[c], a[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < D16; ++c) _mm512_storeu_ps(acc[r] + 16 * c, a[r][c]);
}

// nq query vectors (qs[r], D16 * 16 floats) over the first `len` keys read through `row`;
// writes os[r] and *ls[r] (the log-sum-exp of the scaled scores), as the AVX2 core does
template <int D16>
void attend512(const float* const* qs, float* const* os, float* const* ls, int64_t nq, const int64_t* row,
               int64_t len, const Cache& c, float sc, std::vector<float>& scores, std::vector<float>& acc) {
  constexpr int64_t d = D16 * 16;
  const int64_t bs = c.bs;
  const int64_t padded = (len + 15) / 16 * 16;
  scores.resize(nq * padded);
  acc.assign(nq * d, 0.f);
  std::vector<int64_t> off(padded);  // each key's offset in the head's cache; past len: key 0
  for (int64_t t = 0; t < len; ++t) {
    const int64_t blk = row[t / bs];
    TORCH_CHECK(blk >= 0 && blk < c.nb, "paged attention: block id out of range");
    off[t] = (blk * bs + t % bs) * d;
  }
  std::fill(off.begin() + len, off.end(), off[0]);
  const __m512 scv = _mm512_set1_ps(sc);
  for (int64_t t0 = 0; t0 < padded; t0 += CHUNK) {  // scores, a chunk of keys at a time
    const int64_t t1 = std::min(padded, t0 + CHUNK);
    for (int64_t r = 0; r < nq; ++r) {
      __m512 q[D16];
      for (int x = 0; x < D16; ++x) q[x] = _mm512_loadu_ps(qs[r] + 16 * x);
      float* sr = scores.data() + r * padded;
      for (int64_t t = t0; t < t1; t += 16) {
        if (r == 0 && t + AHEAD < len) lead(c.k + off[t + AHEAD]);
        _mm512_storeu_ps(sr + t, _mm512_mul_ps(dot16<D16>(q, c.k, off.data() + t), scv));
      }
    }
  }
  std::vector<const float*> ps(nq);
  std::vector<float*> as(nq);
  std::vector<float> sums(nq);
  for (int64_t r = 0; r < nq; ++r) {  // softmax per query vector, normalised at the end
    float* sr = scores.data() + r * padded;
    const __mmask16 tail = static_cast<__mmask16>((1u << (len % 16)) - 1);
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512 m16 = ninf;
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) m16 = _mm512_max_ps(m16, _mm512_loadu_ps(sr + t));
    if (t < len) m16 = _mm512_max_ps(m16, _mm512_mask_loadu_ps(ninf, tail, sr + t));
    const float m = _mm512_reduce_max_ps(m16);
    const __m512 mv = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (t = 0; t + 16 <= len; t += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + t), mv));
      _mm512_storeu_ps(sr + t, e);
      sv = _mm512_add_ps(sv, e);
    }
    if (t < len) {
      const __m512 e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_loadu_ps(sr + t), mv)));
      _mm512_storeu_ps(sr + t, e);
      sv = _mm512_add_ps(sv, e);
    }
    const float sum = _mm512_reduce_add_ps(sv);
    *ls[r] = m + std::log(sum);
    sums[r] = sum;
    ps[r] = sr;
    as[r] = acc.data() + r * d;
  }
  for (int64_t t0 = 0; t0 < len; t0 += CHUNK) {  // out = p . v, three query vectors per pass
    const int64_t t1 = std::min(len, t0 + CHUNK);
    int64_t r = 0;
    for (; r + 3 <= nq; r += 3) pv<D16, 3>(ps.data() + r, as.data() + r, c.v, off.data(), t0, t1, len, bs);
    for (; r < nq; ++r) pv<D16, 1>(ps.data() + r, as.data() + r, c.v, off.data(), t0, t1, len, bs);
  }
  for (int64_t r = 0; r < nq; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / sums[r]);
    for (int x = 0; x < D16; ++x) _mm512_storeu_ps(os[r] + 16 * x, _mm512_mul_ps(_mm512_loadu_ps(as[r] + 16 * x), inv));
  }
}

}  // namespace apar_attn
#endif
