// Decode attention straight from the paged KV cache, for CPU (apar_worker/native.py builds it).
//
// Each item is one query token (a decode row, or one of a branch's draft rows) with its own
// list of blocks and number of keys. Work is split over (item, KV head); the query heads of
// one KV head are handled together, so each key and value vector is read once per item. No
// gather, no padding, no mask: the per-row torch path pays a kernel call per row, the batched
// one a gathered, padded copy of every row's context.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

std::vector<at::Tensor> paged_decode(
    const at::Tensor& q,        // [N, H, D] float32
    const at::Tensor& k_cache,  // [KVH, NB, BS, D] float32
    const at::Tensor& v_cache,  // [KVH, NB, BS, D] float32
    const at::Tensor& tables,   // [N, MAXB] int64: each item's blocks, from its first key on
    const at::Tensor& nkeys,    // [N] int64: keys attended (the first nkeys slots of its blocks)
    double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged_decode: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto qc = q.contiguous();
  auto tc = tables.contiguous();
  auto nc = nkeys.contiguous();
  const int64_t n = qc.size(0), h = qc.size(1), d = qc.size(2);
  const int64_t kvh = k_cache.size(0), nb = k_cache.size(1), bs = k_cache.size(2);
  const int64_t maxb = tc.size(1);
  TORCH_CHECK(h % kvh == 0 && k_cache.size(3) == d, "paged_decode: head shapes disagree");
  const int64_t rep = h / kvh;
  auto out = at::empty({n, h, d}, qc.options());
  auto lse = at::empty({n, h}, qc.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* tp = tc.data_ptr<int64_t>();
  const int64_t* np_ = nc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, n * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(rep * d);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / kvh, g = w % kvh;
      const int64_t len = np_[i];
      TORCH_CHECK(len >= 1 && len <= maxb * bs, "paged_decode: key count out of range");
      scores.resize(rep * len);
      const float* qi = qp + (i * h + g * rep) * d;
      const int64_t* row = tp + i * maxb;
      for (int64_t t = 0; t < len; ++t) {  // scores = q . k
        const int64_t blk = row[t / bs];
        TORCH_CHECK(blk >= 0 && blk < nb, "paged_decode: block id out of range");
        const float* kv = kp + ((g * nb + blk) * bs + t % bs) * d;
        for (int64_t r = 0; r < rep; ++r) {
          const float* qr = qi + r * d;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t x = 0; x < d; ++x) s += qr[x] * kv[x];
          scores[r * len + t] = s * sc;
        }
      }
      for (int64_t r = 0; r < rep; ++r) {  // softmax per query head
        float* sr = scores.data() + r * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = sr[t] > m ? sr[t] : m;
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sr[t] = std::exp(sr[t] - m);
          sum += sr[t];
        }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; ++t) sr[t] *= inv;
        lp[i * h + g * rep + r] = m + std::log(sum);
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < len; ++t) {  // out = p . v
        const int64_t blk = row[t / bs];
        const float* vv = vp + ((g * nb + blk) * bs + t % bs) * d;
        for (int64_t r = 0; r < rep; ++r) {
          const float p = scores[r * len + t];
          float* ar = acc.data() + r * d;
#pragma omp simd
          for (int64_t x = 0; x < d; ++x) ar[x] += p * vv[x];
        }
      }
      std::copy(acc.begin(), acc.end(), op + (i * h + g * rep) * d);
    }
  });
  return {out, lse};
}
