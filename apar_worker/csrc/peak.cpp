// The arithmetic peak of this CPU's vector units, for `apar bench step`'s compute floor.
//
// A step of T tokens is bound either by its weight read (bytes / memory bandwidth) or by its
// multiply-adds (2 x weights x T flops / peak rate), whichever is longer: on 2 Zen 4 cores
// (one 512-bit FMA a cycle each) 16 tokens of SmolLM2 are ~4.9 GFLOP, longer than the weight
// read at ~30 GB/s. The rate here is independent FMA chains in registers on every torch
// thread, the most any kernel can reach; bf16 times VDPBF16PS (2 multiply-adds a lane), the
// instruction of the int8 layers with bfloat16 rows (bf16_rows.cpp).
#include <torch/extension.h>
#include "spin_pool.h"

#include <chrono>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

constexpr int64_t ITERS = 4'000'000;  // per thread: ~15-40 ms at 3-4 GHz
constexpr int CHAINS = 12;            // independent accumulators: cover a 4-cycle latency on 2-3 pipes

// ITERS x CHAINS dependent steps a <- step(a); returns one lane's sum so the loop stays. The
// accumulators start apart (make(i + 1)): equal ones the compiler folds into one chain.
template <typename V, typename Make, typename Step, typename Lane>
float run_chains(const Make& make, const Step& step, const Lane& lane) {
  V a[CHAINS];
#pragma GCC unroll 12
  for (int i = 0; i < CHAINS; ++i) a[i] = make(static_cast<float>(i + 1));
  for (int64_t n = 0; n < ITERS; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < CHAINS; ++i) a[i] = step(a[i]);
  }
  float sum = 0.f;
#pragma GCC unroll 12
  for (int i = 0; i < CHAINS; ++i) sum += lane(a[i]);
  return sum;
}

// flops of one thread's chains: 512-bit FMAs (16 lanes x 2), VDPBF16PS (16 lanes x 2 pairs x 2)
// or 256-bit FMAs; 0 where this build has no such instruction
double chains(bool bf16) {
  float sink = 0.f;
  double flops = 0;
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if (bf16) {
    const __m512bh one = (__m512bh)_mm512_set1_epi16(0x3f80);  // bfloat16 1.0 pairs
    sink = run_chains<__m512>([](float v) { return _mm512_set1_ps(v); },
                              [&](__m512 x) { return _mm512_dpbf16_ps(x, one, one); },
                              [](__m512 x) { return _mm512_reduce_add_ps(x); });
    flops = 1.0 * CHAINS * ITERS * 64;
  }
#endif
#if defined(__AVX512F__)
  if (!bf16) {
    const __m512 m = _mm512_set1_ps(0.999999f), c = _mm512_set1_ps(1e-6f);
    sink = run_chains<__m512>([](float v) { return _mm512_set1_ps(v); },
                              [&](__m512 x) { return _mm512_fmadd_ps(x, m, c); },
                              [](__m512 x) { return _mm512_reduce_add_ps(x); });
    flops = 1.0 * CHAINS * ITERS * 32;
  }
#elif defined(__AVX2__) && defined(__FMA__)
  if (!bf16) {
    const __m256 m = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-6f);
    sink = run_chains<__m256>([](float v) { return _mm256_set1_ps(v); },
                              [&](__m256 x) { return _mm256_fmadd_ps(x, m, c); },
                              [](__m256 x) { return _mm256_cvtss_f32(x); });
    flops = 1.0 * CHAINS * ITERS * 16;
  }
#endif
  volatile float keep = sink;  // the chains' result is used: the loop stays
  (void)keep;
  return flops;
}

}  // namespace

// GFLOP/s of every torch thread running FMA chains at once (bf16: VDPBF16PS); 0 where this
// build has no such instruction. The best of 3 runs: a run shares the cores with whatever else runs.
double fma_peak_gflops(bool bf16) {
  const int threads = std::max(1, at::get_num_threads());
  double best = 0;
  for (int run = 0; run < 3; ++run) {
    std::vector<double> flops(threads, 0.0);
    const auto t0 = std::chrono::steady_clock::now();
    apar::parallel_range(0, threads, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) flops[i] = chains(bf16);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double total = 0;
    for (double f : flops) total += f;
    best = std::max(best, total / s / 1e9);
  }
  return best;
}
