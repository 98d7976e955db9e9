// Float32 linear layers for the few rows of a decode step, for CPU (apar_worker/native.py).
//
// A decode or verify step multiplies 1-64 rows by every weight matrix once: the cost is the
// weight read, as on a GPU, if each weight is read from memory once per step whatever the
// row count. The weight is stored once, at load time, as panels of 16 output columns laid
// out k-major ([N/16, K, 16]), so a panel streams sequentially from memory; each panel is then
// multiplied with blocks of up to 6 rows held in registers, re-read from cache (not memory)
// for the next block. Panels are split over the torch threads. Plain GEMM libraries re-pack
// the weights per call or switch algorithm with the row count; this costs the same weight
// read at 1 row as at 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t P = 16;  // output columns per panel
constexpr int64_t MB = 6;  // rows per register block (12 AVX2 accumulators + 2 weight vectors)

template <int R>
inline void store(const float* acc, float* y, int64_t ldy, int64_t cols, const float* bias) {
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < cols; ++c) y[r * ldy + c] = acc[r * P + c] + (bias ? bias[c] : 0.0f);
}

#if defined(__AVX2__) && defined(__FMA__)
template <int R>
inline void block(const float* x, int64_t ldx, const float* w, int64_t k_dim, float* y, int64_t ldy,
                  int64_t cols, const float* bias) {
  __m256 lo[R], hi[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_dim; ++k) {
    const __m256 w0 = _mm256_loadu_ps(w + k * P), w1 = _mm256_loadu_ps(w + k * P + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(x + r * ldx + k);
      lo[r] = _mm256_fmadd_ps(w0, xb, lo[r]);
      hi[r] = _mm256_fmadd_ps(w1, xb, hi[r]);
    }
  }
  alignas(32) float acc[R * P];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(acc + r * P, lo[r]);
    _mm256_store_ps(acc + r * P + 8, hi[r]);
  }
  store<R>(acc, y, ldy, cols, bias);
}
#else  // portable: the same loop order, vectorised by the compiler where it can
template <int R>
inline void block(const float* x, int64_t ldx, const float* w, int64_t k_dim, float* y, int64_t ldy,
                  int64_t cols, const float* bias) {
  float acc[R * P] = {};
  for (int64_t k = 0; k < k_dim; ++k)
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < P; ++c) acc[r * P + c] += w[k * P + c] * x[r * ldx + k];
  store<R>(acc, y, ldy, cols, bias);
}
#endif

void panel(const float* x, int64_t m_dim, int64_t k_dim, const float* w, float* y, int64_t n_dim,
           int64_t cols, const float* bias) {
  // rows split evenly over the fewest blocks of at most MB (16 rows: 6 + 5 + 5, not 6 + 6 + 4):
  // a block of R rows keeps 2R FMA chains in flight, and fewer than ~10 leave the FMA units idle
  const int64_t blocks = (m_dim + MB - 1) / MB;
  for (int64_t b = 0, m0 = 0; b < blocks; ++b) {
    const int64_t rows = (m_dim - m0) / (blocks - b);
    const float* xs = x + m0 * k_dim;
    float* ys = y + m0 * n_dim;
    switch (rows) {
      case 1: block<1>(xs, k_dim, w, k_dim, ys, n_dim, cols, bias); break;
      case 2: block<2>(xs, k_dim, w, k_dim, ys, n_dim, cols, bias); break;
      case 3: block<3>(xs, k_dim, w, k_dim, ys, n_dim, cols, bias); break;
      case 4: block<4>(xs, k_dim, w, k_dim, ys, n_dim, cols, bias); break;
      case 5: block<5>(xs, k_dim, w, k_dim, ys, n_dim, cols, bias); break;
      default: block<6>(xs, k_dim, w, k_dim, ys, n_dim, cols, bias); break;
    }
    m0 += rows;
  }
}

}  // namespace

// weight [N, K] -> panels [ceil(N/16), K, 16], zero-padded past N.
at::Tensor pack_panels(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_panels: float32 [N, K]");
  const int64_t n = weight.size(0), k = weight.size(1), np = (n + P - 1) / P;
  auto padded = at::zeros({np * P, k}, weight.options());
  padded.narrow(0, 0, n).copy_(weight);
  return padded.view({np, P, k}).transpose(1, 2).contiguous();
}

// x [M, K] float32 times panels (pack_panels of an [N, K] weight) -> [M, N], plus bias [N].
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n,
                         const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "skinny_linear: x must be float32 [M, K]");
  TORCH_CHECK(panels.dim() == 3 && panels.size(2) == P && panels.is_contiguous(), "skinny_linear: bad panels");
  TORCH_CHECK(panels.size(1) == x.size(1) && panels.size(0) * P >= n, "skinny_linear: shapes disagree");
  auto xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1), np = (n + P - 1) / P;
  auto out = at::empty({m, n}, xc.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.numel() == n && b.scalar_type() == at::kFloat, "skinny_linear: bias must be float32 [N]");
  }
  const float* xp = xc.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  float* yp = out.data_ptr<float>();
  at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(P, n - p * P);
      panel(xp, m, k, wp + p * k * P, yp + p * P, n, cols, bp ? bp + p * P : nullptr);
    }
  });
  return out;
}
