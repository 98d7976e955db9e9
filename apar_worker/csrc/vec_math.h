// AVX2 helpers shared by the engine's CPU kernels (apar_worker/csrc/).
#pragma once

// e^x = 2^n e^r, r = x - n ln 2 (ln 2 in two parts), e^r by Cephes' polynomial: ~1e-7 relative
// error; shared by the AVX2 and AVX-512 versions (exp8 here, exp16 in attend512.h)
namespace apar_exp {
constexpr float LOG2E = 1.44269504088896341f, LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f, LOWEST = -87.3f;
constexpr float POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                           4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace apar_exp

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// e^x for x <= 0 (scores minus their max, -|x|)
inline __m256 exp8(__m256 x) {
  using namespace apar_exp;
  x = _mm256_max_ps(x, _mm256_set1_ps(LOWEST));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_HI), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(LN2_LO), x);
  __m256 y = _mm256_set1_ps(POLY[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(POLY[i]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif
