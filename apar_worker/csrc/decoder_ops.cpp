// The small per-layer ops of a Llama-style decoder, fused, for CPU (apar_worker/lean_forward.py).
//
// With 1-64 rows a step spends more time in the dozens of tiny torch ops around each layer's
// matrix products (RMSNorm is eight of them, rotary ten) than in their arithmetic: each call
// costs microseconds of dispatch. These do the same float32 arithmetic in one call each.
#include <torch/extension.h>
#include "spin_pool.h"

#include <algorithm>
#include <cmath>

#include "vec_math.h"

namespace {

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), what, ": float32, contiguous");
}

}  // namespace

// residual += delta (when given), then RMSNorm(residual) * weight, as HF's LlamaRMSNorm.
at::Tensor add_rms_norm_(at::Tensor& residual, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                         double eps) {
  check_rows(residual, "add_rms_norm_");
  check_rows(weight, "add_rms_norm_ weight");
  const int64_t h = residual.size(-1), t = residual.numel() / h;
  TORCH_CHECK(weight.numel() == h, "add_rms_norm_: weight size != hidden size");
  float* rp = residual.data_ptr<float>();
  const float* dp = nullptr;
  if (delta.has_value() && delta->defined()) {
    check_rows(*delta, "add_rms_norm_ delta");
    TORCH_CHECK(delta->numel() == residual.numel(), "add_rms_norm_: delta shape != residual shape");
    dp = delta->data_ptr<float>();
  }
  auto out = at::empty_like(residual);
  float* op = out.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  apar::parallel_range(0, t, 8, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* r = rp + i * h;
      if (dp)
        for (int64_t x = 0; x < h; ++x) r[x] += dp[i * h + x];
      float ss = 0.f;
      for (int64_t x = 0; x < h; ++x) ss += r[x] * r[x];
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
      for (int64_t x = 0; x < h; ++x) op[i * h + x] = wp[x] * (r[x] * inv);
    }
  });
  return out;
}

// Rotary embedding in place, HF's half-split layout: x [T, heads, D] (rows may be strided, as
// the q or k columns of a fused projection), cos/sin [T, D].
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(cos, "rope_ cos");
  check_rows(sin, "rope_ sin");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.size(2) % 2 == 0, "rope_: x must be float32 [T, heads, D], D even");
  TORCH_CHECK(x.stride(2) == 1 && x.stride(1) == x.size(2), "rope_: each row's heads must be contiguous");
  const int64_t t = x.size(0), nh = x.size(1), d = x.size(2), half = d / 2, ld = x.stride(0);
  TORCH_CHECK(cos.numel() == t * d && sin.numel() == t * d, "rope_: cos/sin must be [T, D]");
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i) {
    const float* c = cp + i * d;
    const float* s = sp + i * d;
    for (int64_t hh = 0; hh < nh; ++hh) {
      float* v = xp + i * ld + hh * d;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j + half] + a * s[j + half];
      }
    }
  }
}

// silu(gate) * up, elementwise: gate and up [T, I] (rows may be strided: the halves of a fused
// gate-up projection) -> [T, I].
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat, "silu_mul: float32 only");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes(), "silu_mul: gate and up shapes differ");
  TORCH_CHECK(gate.stride(1) == 1 && up.stride(1) == 1, "silu_mul: rows must be contiguous");
  const int64_t t = gate.size(0), n = gate.size(1), lg = gate.stride(0), lu = up.stride(0);
  auto out = at::empty({t, n}, gate.options());
  const float* gp = gate.data_ptr<float>();
  const float* upp = up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  apar::parallel_range(0, t, 1, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const float* g = gp + row * lg;
      const float* u = upp + row * lu;
      float* o = op + row * n;
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
      for (; i + 8 <= n; i += 8) {  // sigmoid from e^-|g| (never overflows)
        const __m256 gv = _mm256_loadu_ps(g + i);
        const __m256 ex = exp8(_mm256_or_ps(gv, sign));
        const __m256 pos = _mm256_div_ps(one, _mm256_add_ps(one, ex));
        const __m256 sig = _mm256_blendv_ps(pos, _mm256_mul_ps(ex, pos), gv);  // g < 0: e^g / (1 + e^g)
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
      }
#endif
      for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
    }
  });
  return out;
}

// The index of each row's largest value, as torch.argmax(dim=-1) (the first one; a NaN counts
// as largest): logits [N, V] float32 -> [N] int64. torch's own ran ~1 ms for 16 x 49152 rows
// on 2 vCPUs, about 6 % of an int8 step, and its OpenMP threads then spun beside the kernels' pool.
at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "argmax_rows: logits must be [N, V], V > 0");
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.stride(1) == 1, "argmax_rows: float32 rows");
  const int64_t n = logits.size(0), v = logits.size(1), ld = logits.stride(0);
  auto out = at::empty({n}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  apar::parallel_range(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t row = b; row < e; ++row) {
      const float* x = lp + row * ld;
      float best = x[0];
      bool any_nan = best != best;
      int64_t i = 0;
#if defined(__AVX512F__)
      __m512 m = _mm512_set1_ps(best);
      __mmask16 bad = 0;
      for (; i + 16 <= v; i += 16) {
        const __m512 y = _mm512_loadu_ps(x + i);
        m = _mm512_max_ps(m, y);
        bad |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
      }
      best = _mm512_reduce_max_ps(m);
      any_nan |= bad != 0;
#endif
      for (; i < v; ++i) best = x[i] > best ? x[i] : best, any_nan |= x[i] != x[i];
      int64_t at = 0;  // the first position of the largest value (or of the first NaN)
      while (at < v && !(any_nan ? x[at] != x[at] : x[at] == best)) ++at;
      op[row] = at;
    }
  });
  return out;
}

// K and V of T tokens ([T, KVH, D], rows any stride apart) into their cache slots (slot s: block
// s / BS, offset s % BS, in every KV head): the two index_copy_ calls this replaces cost ~15 us
// a layer of dispatch and iteration for a few KB of copies (16 rows: ~1 ms a step)
void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
               const at::Tensor& v) {
  check_rows(k_cache, "write_kv_ k_cache");
  check_rows(v_cache, "write_kv_ v_cache");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "write_kv_: caches [KVH, NB, BS, D]");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat &&
                  k.stride(2) == 1 && v.stride(2) == 1,
              "write_kv_: k, v float32 [T, KVH, D] with contiguous rows");
  const int64_t kvh = k_cache.size(0), total = k_cache.size(1) * k_cache.size(2), d = k_cache.size(3), t = k.size(0);
  TORCH_CHECK(k.size(1) == kvh && k.size(2) == d && slots.numel() == t && slots.scalar_type() == at::kLong,
              "write_kv_: shapes disagree");
  const auto sc = slots.contiguous();
  const int64_t* sp = sc.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < total, "write_kv_: slot out of range");
    for (int64_t g = 0; g < kvh; ++g) {
      std::copy_n(kp + i * k.stride(0) + g * k.stride(1), d, kc + (g * total + sp[i]) * d);
      std::copy_n(vp + i * v.stride(0) + g * v.stride(1), d, vc + (g * total + sp[i]) * d);
    }
  }
}
