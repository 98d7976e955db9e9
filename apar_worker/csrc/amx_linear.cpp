// Int8 linear layers on AMX tiles (Intel Xeon from Sapphire Rapids on), for CPU (native.py).
//
// skinny_linear.cpp widens int8 weights to float32 and multiplies them with FMAs: from a few
// rows on, a step is bound by those FMAs, not by the weight read. AMX multiplies int8 tiles
// (16 rows x 64) into int32 at about 1000 multiply-adds a cycle, so a step of up to 64 rows
// costs about the weight read again. The weights are stored as AMX's B tiles: per 16-column
// panel, [K/4, 16, 4] int8 (pack_panels_amx). The rows are quantized per row in two int8
// levels, x ~= s * (q1 + q2 / 254): the second level holds the first's rounding error, so a
// row is kept to about 2^-16 of its largest value (bfloat16 keeps 2^-9 of each value), and the
// products are exact int32 sums. Unavailable (amx_available() false) where the CPU has no AMX-INT8
// or the kernel does not grant the tile state; the FMA kernel then serves.
//
// Float32 layers (`linear_kernel: amx` only) run the same way in bfloat16 pieces: each weight
// is stored as hi + lo (two bfloat16, 4 bytes as in float32), each row likewise, and a tile
// product sums hi*hi + hi*lo + lo*hi in float32, so every operand keeps 16 of float32's 24
// significant bits (results within ~1e-5 of float32's, relative to the output's largest value).
#include <torch/extension.h>
#include "spin_pool.h"

#include <cmath>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__x86_64__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)  // AMX intrinsics
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define APAR_AMX 1
#endif
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t P = 16;    // output columns per panel: one int32 C tile is 16 x 16
constexpr int64_t KT = 64;   // k per tile: a tile row is 64 bytes
constexpr int64_t MR = 16;   // rows per tile
constexpr float L2 = 254.f;  // the second level's step: 1/254 of the first's

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

#if APAR_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool request_amx() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-BF16, -TILE, -INT8
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

// every tile row is 64 bytes; tiles from `first_b` on are B tiles (16 rows), the rest C and A
// tiles of `rows` rows. int8: 0-3 C (panel 0 level 1, panel 0 level 2, panel 1 level 1, panel 1
// level 2), 4-5 A (the rows' two levels), 6-7 B (the two panels). bf16: 0-1 C (the two panels),
// 2-3 A (the rows' hi and lo), 4-7 B (panel 0 hi, lo, panel 1 hi, lo).
__attribute__((target("amx-tile"))) void configure(int64_t rows, int first_b) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = KT;
    cfg.rows[t] = static_cast<uint8_t>(t >= first_b ? 16 : rows);
  }
  asm volatile("" ::: "memory");  // ldtilecfg reads all 64 bytes; its asm names only the first 8
  _tile_loadconfig(&cfg);
}

// the hardware prefetcher does not run far enough ahead of tile loads (a cold 16-row product
// ran at a third of the copy bandwidth): each chunk's tiles fetch the next pair's same chunk
inline void prefetch(const void* at, int64_t bytes = KT / 4 * P * 4) {
  for (int64_t line = 0; line < bytes; line += 64)
    _mm_prefetch(static_cast<const char*>(at) + line, _MM_HINT_T1);
}

// int32 sums of `rows` rows (both levels) with one or two panels over k_pad; acc [4][16][16]
__attribute__((target("amx-tile,amx-int8"))) void tile_block(const int8_t* q1, const int8_t* q2, int64_t k_pad,
                                                             const int8_t* w0, const int8_t* w1, const int8_t* next,
                                                             int32_t* acc) {
  const int64_t ldw = P * 4, tile = KT / 4 * ldw;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const int64_t chunks = k_pad / KT;
  for (int64_t kc = 0; kc < chunks; ++kc) {
    if (next) {
      prefetch(next + kc * tile);
      prefetch(next + (chunks + kc) * tile);
    }
    _tile_loadd(4, q1 + kc * KT, k_pad);
    _tile_loadd(5, q2 + kc * KT, k_pad);
    _tile_loadd(6, w0 + kc * tile, ldw);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 5, 6);
    if (w1) {
      _tile_loadd(7, w1 + kc * tile, ldw);
      _tile_dpbssd(2, 4, 7);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, acc, P * 4);
  _tile_stored(1, acc + MR * P, P * 4);
  if (w1) {
    _tile_stored(2, acc + 2 * MR * P, P * 4);
    _tile_stored(3, acc + 3 * MR * P, P * 4);
  }
}

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

// block(w0, w1, next, p, r0, rows) for every pair of panels p, p + 1 (w1 null past the last
// panel; next: the following pair, to prefetch) and block of up to 16 rows from r0, pairs split
// over the pool, tiles configured for `rows` (`first_b`: see configure). `panel`: W per panel.
template <typename W, typename F>
void over_pairs(const W* w, int64_t np, int64_t panel, int64_t m, int first_b, const F& block) {
  apar::parallel_range(0, (np + 1) / 2, 1, [&](int64_t pair0, int64_t pair1) {
    int64_t configured = 0;
    for (int64_t pair = pair0; pair < pair1; ++pair) {
      const int64_t p = 2 * pair;
      const W* w0 = w + p * panel;
      const W* w1 = p + 1 < np ? w0 + panel : nullptr;
      for (int64_t r0 = 0; r0 < m; r0 += MR) {
        const int64_t rows = std::min(MR, m - r0);
        if (rows != configured) configure(configured = rows, first_b);
        block(w0, w1, r0 == 0 && p + 2 < np ? w0 + 2 * panel : nullptr, p, r0, rows);
      }
    }
    if (configured) release();
  });
}

constexpr int64_t KB = 32;  // k per bfloat16 tile: 32 values of 2 bytes a row

// float32 sums of `rows` rows (hi, lo) with one or two panels ([K/32][hi, lo][16 x 32] bf16); acc [2][16][16]
__attribute__((target("amx-tile,amx-bf16"))) void tile_block_bf16(const uint16_t* hi, const uint16_t* lo,
                                                                  int64_t k_pad, const uint16_t* w0,
                                                                  const uint16_t* w1, const uint16_t* next,
                                                                  float* acc) {
  constexpr int64_t tile = 16 * KB;  // bf16 values in one B tile
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t kc = 0; kc < k_pad / KB; ++kc) {
    if (next) {
      prefetch(next + kc * 2 * tile, 4 * tile);  // the next pair's two tiles of this chunk, per panel
      prefetch(next + (k_pad / KB + kc) * 2 * tile, 4 * tile);
    }
    _tile_loadd(2, hi + kc * KB, k_pad * 2);
    _tile_loadd(3, lo + kc * KB, k_pad * 2);
    _tile_loadd(4, w0 + kc * 2 * tile, 64);
    _tile_loadd(5, w0 + kc * 2 * tile + tile, 64);
    _tile_dpbf16ps(0, 3, 4);  // lo * hi, hi * lo, then hi * hi
    _tile_dpbf16ps(0, 2, 5);
    _tile_dpbf16ps(0, 2, 4);
    if (w1) {
      _tile_loadd(6, w1 + kc * 2 * tile, 64);
      _tile_loadd(7, w1 + kc * 2 * tile + tile, 64);
      _tile_dpbf16ps(1, 3, 6);
      _tile_dpbf16ps(1, 2, 7);
      _tile_dpbf16ps(1, 2, 6);
    }
  }
  _tile_stored(0, acc, P * 4);
  if (w1) _tile_stored(1, acc + MR * P, P * 4);
}
#endif

// float32 -> bfloat16 bits, rounded to nearest even (what torch's .to(bfloat16) gives)
inline uint16_t bf16_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

inline float float_of(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if defined(__AVX512F__)
inline __m512i bf16_bits(__m512 v) {  // bf16_of per lane, in the low 16 bits of each 32
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}
#endif

// rows [M, K] float32 -> bfloat16 hi and lo [M, k_pad] (x ~= hi + lo; zero past K)
void split_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, uint16_t* hi, uint16_t* lo) {
  std::memset(hi, 0, m * k_pad * 2);
  std::memset(lo, 0, m * k_pad * 2);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    uint16_t *h = hi + r * k_pad, *l = lo + r * k_pad;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= k; i += 16) {
      const __m512 v = _mm512_loadu_ps(row + i);
      const __m512i hb = bf16_bits(v);
      const __m512i lb = bf16_bits(_mm512_sub_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(hb, 16))));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + i), _mm512_cvtepi32_epi16(hb));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(l + i), _mm512_cvtepi32_epi16(lb));
    }
#endif
    for (; i < k; ++i) {
      h[i] = bf16_of(row[i]);
      l[i] = bf16_of(row[i] - float_of(h[i]));
    }
  }
}

// y[r, c] = ws[c] * xs[r] * (level 1 + level 2 / 254) + bias[c], for one panel's columns
void finish(const int32_t* acc, int64_t rows, float* y, int64_t ldy, int64_t cols, const float* xs,
            const float* ws, const float* bias) {
#if defined(__AVX512F__)
  if (cols == P) {  // a full panel: one vector per row
    const __m512 w = _mm512_loadu_ps(ws), b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    const __m512 step = _mm512_set1_ps(1.f / L2);
    for (int64_t r = 0; r < rows; ++r) {
      const __m512 a1 = _mm512_cvtepi32_ps(_mm512_load_si512(acc + r * P));
      const __m512 a2 = _mm512_cvtepi32_ps(_mm512_load_si512(acc + MR * P + r * P));
      const __m512 sum = _mm512_fmadd_ps(a2, step, a1);
      _mm512_storeu_ps(y + r * ldy, _mm512_fmadd_ps(_mm512_mul_ps(sum, _mm512_set1_ps(xs[r])), w, b));
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      // the vector path's operations, in its order
      const float sum = std::fma(static_cast<float>(acc[MR * P + r * P + c]), 1.f / L2, static_cast<float>(acc[r * P + c]));
      y[r * ldy + c] = std::fma(sum * xs[r], ws[c], bias ? bias[c] : 0.f);
    }
}

// one row's values [i0, k) as the two levels (v = x / s), in scalar code
void quantize_tail(const float* row, int64_t i0, int64_t k, float inv, int8_t* q1, int8_t* q2) {
  for (int64_t i = i0; i < k; ++i) {
    const float v = row[i] * inv, a = std::nearbyint(v);
    q1[i] = static_cast<int8_t>(a);
    q2[i] = static_cast<int8_t>(std::nearbyint((v - a) * L2));
  }
}

// rows [M, K] float32 -> two int8 levels [M, k_pad] (zero past K) and a scale per row
void quantize_rows(const float* x, int64_t m, int64_t k, int64_t k_pad, int8_t* q1, int8_t* q2, float* xs) {
  std::memset(q1, 0, m * k_pad);
  std::memset(q2, 0, m * k_pad);
  for (int64_t r = 0; r < m; ++r) {
    const float* row = x + r * k;
    int8_t *r1 = q1 + r * k_pad, *r2 = q2 + r * k_pad;
    float top = 0.f;
    int64_t i = 0;
#if defined(__AVX512F__)
    __m512 vtop = _mm512_setzero_ps();
    for (; i + 16 <= k; i += 16) vtop = _mm512_max_ps(vtop, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
    top = _mm512_reduce_max_ps(vtop);
#endif
    for (; i < k; ++i) top = std::max(top, std::fabs(row[i]));
    const float s = top > 0.f ? top / 127.f : 1.f, inv = 1.f / s;
    xs[r] = s;
    i = 0;
#if defined(__AVX512F__)
    constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    const __m512 vinv = _mm512_set1_ps(inv), step = _mm512_set1_ps(L2);
    for (; i + 16 <= k; i += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(row + i), vinv), a = _mm512_roundscale_ps(v, nearest);
      const __m512 b = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, a), step), nearest);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r1 + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(a)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(r2 + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(b)));
    }
#endif
    quantize_tail(row, i, k, inv, r1, r2);
  }
}

}  // namespace

bool amx_available() {
#if APAR_AMX
  static std::once_flag once;
  static bool granted = false;
  std::call_once(once, [] { granted = request_amx(); });
  return granted;
#else
  return false;
#endif
}

// int8 weight [N, K] -> B tiles [ceil(N/16), K_pad/4, 64] (K_pad: K rounded up to 64), zero-padded;
// float32 weight -> bfloat16 B tiles [ceil(N/16), K_pad/32, 2 (hi, lo), 16, 32] (K_pad: to 32).
at::Tensor pack_panels_amx(const at::Tensor& weight) {
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(weight.dim() == 2 && (int8 || weight.scalar_type() == at::kFloat),
              "pack_panels_amx: int8 or float32 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1), np = (n + P - 1) / P, kp = round_up(k, int8 ? KT : KB);
  if (!int8) {
    auto padded = at::zeros({np * P, kp}, weight.options());
    padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
    const auto hi = padded.to(at::kBFloat16), lo = (padded - hi.to(at::kFloat)).to(at::kBFloat16);
    auto tiles = [&](const at::Tensor& t) { return t.view({np, P, kp / KB, 16, 2}).permute({0, 2, 3, 1, 4}); };
    return at::stack({tiles(hi), tiles(lo)}, 2).reshape({np, kp / KB, 2, 16, 2 * P}).contiguous();
  }
  auto padded = at::zeros({np * P, kp}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  return padded.view({np, P, kp / 4, 4}).permute({0, 2, 1, 3}).reshape({np, kp / 4, P * 4}).contiguous();
}

// x [M, K] float32 times AMX panels (pack_panels_amx) with per-column scales [N], + bias [N].
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, const float* bias,
                      const float* scales) {
  TORCH_CHECK(amx_available(), "amx_linear: this CPU or kernel grants no AMX tiles");
  const int64_t m = x.size(0), k = x.size(1), kp = round_up(k, KT), np = panels.size(0);
  TORCH_CHECK(panels.size(1) * 4 == kp && np * P >= n, "amx_linear: panels and rows disagree");
  auto out = at::empty({m, n}, x.options());
  std::vector<int8_t> q1(m * kp), q2(m * kp);
  std::vector<float> xs(m);
  quantize_rows(x.data_ptr<float>(), m, k, kp, q1.data(), q2.data(), xs.data());
#if APAR_AMX
  float* y = out.data_ptr<float>();
  over_pairs(panels.data_ptr<int8_t>(), np, kp * P, m, 6,
             [&](const int8_t* w0, const int8_t* w1, const int8_t* next, int64_t p, int64_t r0, int64_t rows) {
               alignas(64) int32_t acc[4 * MR * P];
               tile_block(q1.data() + r0 * kp, q2.data() + r0 * kp, kp, w0, w1, next, acc);
               for (int64_t j = 0; j < (w1 ? 2 : 1); ++j) {
                 const int64_t off = (p + j) * P, cols = std::min(P, n - off);
                 if (cols > 0)
                   finish(acc + j * 2 * MR * P, rows, y + r0 * n + off, n, cols, xs.data() + r0, scales + off,
                          bias ? bias + off : nullptr);
               }
             });
#endif
  return out;
}

// x [M, K] float32 times bfloat16 AMX panels (pack_panels_amx of a float32 weight), + bias [N].
at::Tensor amx_float_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, const float* bias) {
  TORCH_CHECK(amx_available(), "amx_linear: this CPU or kernel grants no AMX tiles");
  const int64_t m = x.size(0), k = x.size(1), kp = round_up(k, KB), np = panels.size(0);
  TORCH_CHECK(panels.dim() == 5 && panels.size(1) * KB == kp && np * P >= n, "amx_linear: panels and rows disagree");
  auto out = at::empty({m, n}, x.options());
  std::vector<uint16_t> hi(m * kp), lo(m * kp);
  split_rows(x.data_ptr<float>(), m, k, kp, hi.data(), lo.data());
#if APAR_AMX
  const auto* w = reinterpret_cast<const uint16_t*>(panels.data_ptr<at::BFloat16>());
  float* y = out.data_ptr<float>();
  over_pairs(w, np, kp * 2 * P, m, 4,
             [&](const uint16_t* w0, const uint16_t* w1, const uint16_t* next, int64_t p, int64_t r0, int64_t rows) {
               alignas(64) float acc[2 * MR * P];
               tile_block_bf16(hi.data() + r0 * kp, lo.data() + r0 * kp, kp, w0, w1, next, acc);
               for (int64_t j = 0; j < (w1 ? 2 : 1); ++j) {
                 const int64_t off = (p + j) * P, cols = std::min(P, n - off);
                 for (int64_t r = 0; r < rows; ++r)
                   for (int64_t c = 0; c < cols; ++c)
                     y[(r0 + r) * n + off + c] = acc[j * MR * P + r * P + c] + (bias ? bias[off + c] : 0.f);
               }
             });
#endif
  return out;
}
