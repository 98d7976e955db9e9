// Decode attention straight from the paged KV cache, for CPU (apar_worker/native.py builds it).
//
// `paged_decode`: each item is one query token (a decode row, or one of a branch's draft rows)
// with its own list of blocks and number of keys. Work is split over (item, KV head); the query
// heads of one KV head are handled together, so each key and value vector is read once per
// item. No gather, no padding, no mask: the per-row torch path pays a kernel call per row, the
// batched one a gathered, padded copy of every row's context.
//
// `paged_prefix`: the query tokens of a group of sibling rows (cascade attention) over the
// prefix blocks they share, so each shared key and value is read once per group, not per row.
#include <torch/extension.h>
#include "spin_pool.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attend512.h"
#include "vec_math.h"

namespace {

constexpr int64_t PREFIX_CHUNK = 4;  // query tokens per work item in paged_prefix
constexpr int64_t MIN_SPLIT_KEYS = 128;  // keys per split at least, where paged_decode splits a row's keys

// One query vector's attention over a second, disjoint key set merged into the first, by their
// log-sum-exps (dst, *dst_l <- the softmax over both)
inline void merge_one(float* dst, float* dst_l, const float* add, float add_l, int64_t d) {
  const float l1 = *dst_l, mx = std::max(l1, add_l);
  const float w1 = std::exp(l1 - mx), w2 = std::exp(add_l - mx), inv = 1.f / (w1 + w2);
  for (int64_t x = 0; x < d; ++x) dst[x] = (dst[x] * w1 + add[x] * w2) * inv;
  *dst_l = mx + std::log(w1 + w2);
}

using apar_attn::AHEAD;
using apar_attn::Cache;
using apar_attn::lead;

#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t TCH = 64;  // keys per chunk: a chunk's K or V (64 x D floats) stays in L1

// Eight dot products q . k[j] (DC * 8 floats each), as one vector of eight sums.
template <int DC>
inline __m256 dot8(const float* q, const float* const* k) {
  __m256 a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
  for (int c = 0; c < DC; ++c) {
    const __m256 qc = _mm256_loadu_ps(q + 8 * c);
    for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[j] + 8 * c), a[j]);
  }
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 w = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u, w, 0x20), _mm256_permute2f128_ps(u, w, 0x31));
}

template <int DC>
void attend_vec(const float* const* qs, float* const* os, float* const* ls, int64_t nq, const int64_t* row,
                int64_t len, const Cache& c, float sc, std::vector<float>& scores, std::vector<float>& acc) {
  constexpr int64_t d = DC * 8;
  const int64_t bs = c.bs;
  scores.resize(nq * len);
  acc.assign(nq * d, 0.f);
  std::vector<float> sums(nq);
  std::vector<int64_t> off(len);  // each key's offset in the head's cache: one division per key
  for (int64_t t = 0; t < len; ++t) {
    const int64_t blk = row[t / bs];
    TORCH_CHECK(blk >= 0 && blk < c.nb, "paged attention: block id out of range");
    off[t] = (blk * bs + t % bs) * d;
  }
  const float* kp[8];
  for (int64_t t0 = 0; t0 < len; t0 += TCH) {  // scores = q . k, a chunk of keys at a time
    const int64_t t1 = std::min(len, t0 + TCH);
    for (int64_t r = 0; r < nq; ++r) {
      float* sr = scores.data() + r * len;
      int64_t t = t0;
      for (; t + 8 <= t1; t += 8) {
        if (r == 0 && t % bs == 0 && t + AHEAD < len) lead(c.k + off[t + AHEAD]);
        for (int j = 0; j < 8; ++j) kp[j] = c.k + off[t + j];
        _mm256_storeu_ps(sr + t, _mm256_mul_ps(dot8<DC>(qs[r], kp), _mm256_set1_ps(sc)));
      }
      for (; t < t1; ++t) {
        const float* kv = c.k + off[t];
        __m256 a = _mm256_setzero_ps();
        for (int x = 0; x < DC; ++x) a = _mm256_fmadd_ps(_mm256_loadu_ps(qs[r] + 8 * x), _mm256_loadu_ps(kv + 8 * x), a);
        sr[t] = hsum(a) * sc;
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r) {  // softmax per query vector, normalised at the end
    float* sr = scores.data() + r * len;
    __m256 m8 = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(sr + t));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m8);
    float m = *std::max_element(lanes, lanes + 8);
    for (; t < len; ++t) m = sr[t] > m ? sr[t] : m;
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sv = _mm256_setzero_ps();
    t = 0;
    for (; t + 8 <= len; t += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + t), mv));
      _mm256_storeu_ps(sr + t, e);
      sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    for (; t < len; ++t) {
      sr[t] = std::exp(sr[t] - m);
      sum += sr[t];
    }
    *ls[r] = m + std::log(sum);
    sums[r] = sum;
  }
  for (int64_t t0 = 0; t0 < len; t0 += TCH) {  // out = p . v, accumulated per chunk of keys
    const int64_t t1 = std::min(len, t0 + TCH);
    for (int64_t r = 0; r < nq; ++r) {
      const float* pr = scores.data() + r * len;
      float* ar = acc.data() + r * d;
      __m256 a[DC];
      for (int x = 0; x < DC; ++x) a[x] = _mm256_loadu_ps(ar + 8 * x);
      for (int64_t t = t0; t < t1; ++t) {
        if (r == 0 && t % bs == 0 && t + AHEAD < len) lead(c.v + off[t + AHEAD]);
        const float* vv = c.v + off[t];
        const __m256 p = _mm256_set1_ps(pr[t]);
        for (int x = 0; x < DC; ++x) a[x] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vv + 8 * x), a[x]);
      }
      for (int x = 0; x < DC; ++x) _mm256_storeu_ps(ar + 8 * x, a[x]);
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    const float inv = 1.f / sums[r];
    for (int64_t x = 0; x < d; ++x) os[r][x] = acc[r * d + x] * inv;
  }
}
#endif

// The portable loops (any head size, no AVX2), and the reference the vector path matches.
void attend_scalar(const float* const* qs, float* const* os, float* const* ls, int64_t nq, const int64_t* row,
            int64_t len, const Cache& c, float sc, std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t d = c.d, bs = c.bs;
  scores.resize(nq * len);
  acc.assign(nq * d, 0.f);
  for (int64_t t = 0; t < len; ++t) {  // scores = q . k
    const int64_t blk = row[t / bs];
    TORCH_CHECK(blk >= 0 && blk < c.nb, "paged attention: block id out of range");
    const float* kv = c.k + (blk * bs + t % bs) * d;
    for (int64_t r = 0; r < nq; ++r) {
      const float* qr = qs[r];
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t x = 0; x < d; ++x) s += qr[x] * kv[x];
      scores[r * len + t] = s * sc;
    }
  }
  for (int64_t r = 0; r < nq; ++r) {  // softmax per query vector
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
    *ls[r] = m + std::log(sum);
  }
  for (int64_t t = 0; t < len; ++t) {  // out = p . v
    const float* vv = c.v + (row[t / bs] * bs + t % bs) * d;
    for (int64_t r = 0; r < nq; ++r) {
      const float p = scores[r * len + t];
      float* ar = acc.data() + r * d;
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) ar[x] += p * vv[x];
    }
  }
  for (int64_t r = 0; r < nq; ++r) std::copy(acc.begin() + r * d, acc.begin() + (r + 1) * d, os[r]);
}

// nq query vectors (qs[r], d floats each) over the first `len` keys read through `row`;
// writes os[r] (d floats) and *ls[r] (the log-sum-exp of the scaled scores).
void attend(const float* const* qs, float* const* os, float* const* ls, int64_t nq, const int64_t* row,
            int64_t len, const Cache& c, float sc, std::vector<float>& scores, std::vector<float>& acc) {
#if defined(__AVX512F__)
  switch (c.d) {
    case 16: return apar_attn::attend512<1>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    case 32: return apar_attn::attend512<2>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    case 64: return apar_attn::attend512<4>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    case 128: return apar_attn::attend512<8>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    default: break;
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  switch (c.d) {
    case 16: return attend_vec<2>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    case 32: return attend_vec<4>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    case 64: return attend_vec<8>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    case 128: return attend_vec<16>(qs, os, ls, nq, row, len, c, sc, scores, acc);
    default: break;
  }
#endif
  attend_scalar(qs, os, ls, nq, row, len, c, sc, scores, acc);
}

// Parts 1..splits-1 of `count` query vectors (part s at op + s * count * d) merged into part 0;
// an empty part (log-sum-exp -inf) weighs nothing
void merge_splits(float* op, float* lp, int64_t splits, int64_t count, int64_t d) {
  for (int64_t sp = 1; sp < splits; ++sp)
    for (int64_t i = 0; i < count; ++i)
      if (lp[sp * count + i] > -std::numeric_limits<float>::infinity())
        merge_one(op + i * d, lp + i, op + (sp * count + i) * d, lp[sp * count + i], d);
}

// the query vectors of an empty split: no keys, weight 0
void clear_part(const std::vector<float*>& os, const std::vector<float*>& ls, int64_t d) {
  for (float* l : ls) *l = -std::numeric_limits<float>::infinity();
  for (float* o : os) std::fill(o, o + d, 0.f);
}

// keys per split of `keys` over `splits` parts, a whole number of `bs`-key blocks
int64_t split_span(int64_t keys, int64_t splits, int64_t bs) {
  const int64_t span = (keys + splits - 1) / splits;
  return (span + bs - 1) / bs * bs;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "paged attention: bad ranks");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0 && k_cache.size(3) == q.size(2),
              "paged attention: head shapes disagree");
}

Cache head_cache(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t g) {
  const int64_t nb = k_cache.size(1), bs = k_cache.size(2), d = k_cache.size(3);
  return {k_cache.data_ptr<float>() + g * nb * bs * d, v_cache.data_ptr<float>() + g * nb * bs * d, nb, bs, d};
}

}  // namespace

std::vector<at::Tensor> paged_decode(
    const at::Tensor& q,        // [N, H, D] float32
    const at::Tensor& k_cache,  // [KVH, NB, BS, D] float32
    const at::Tensor& v_cache,  // [KVH, NB, BS, D] float32
    const at::Tensor& tables,   // [N, MAXB] int64: each item's blocks, from its first key on
    const at::Tensor& nkeys,    // [N] int64: keys attended (the first nkeys slots of its blocks)
    double scale) {
  check_inputs(q, k_cache, v_cache);
  auto qc = q.contiguous();
  auto tc = tables.contiguous();
  auto nc = nkeys.contiguous();
  const int64_t n = qc.size(0), h = qc.size(1), d = qc.size(2);
  const int64_t kvh = k_cache.size(0), bs = k_cache.size(2), maxb = tc.size(1), rep = h / kvh;
  // few items for the threads (one row: 3 KV heads on 2 threads): each row's keys split too
  const int64_t* np_ = nc.data_ptr<int64_t>();
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t longest = 0;
  for (int64_t i = 0; i < n; ++i) longest = std::max(longest, np_[i]);
  const int64_t splits =
      n * kvh % threads != 0 && n * kvh < 4 * threads ? std::clamp<int64_t>(longest / MIN_SPLIT_KEYS, 1, threads) : 1;
  const int64_t span_b = split_span(longest, splits, bs);
  auto out = at::empty({splits, n, h, d}, qc.options());
  auto lse = at::empty({splits, n, h}, qc.options());
  const float* qp = qc.data_ptr<float>();
  const int64_t* tp = tc.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  apar::parallel_range(0, n * kvh * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc;
    std::vector<const float*> qs(rep);
    std::vector<float*> os(rep), ls(rep);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t sp = w % splits, i = w / splits / kvh, g = (w / splits) % kvh, len = np_[i];
      TORCH_CHECK(len >= 1 && len <= maxb * bs, "paged_decode: key count out of range");
      for (int64_t r = 0; r < rep; ++r) {
        const int64_t head = i * h + g * rep + r;
        qs[r] = qp + head * d;
        os[r] = op + (sp * n * h + head) * d;
        ls[r] = lp + sp * n * h + head;
      }
      const int64_t k0 = sp * span_b, k1 = std::min(len, k0 + span_b);
      if (k0 >= k1) {
        clear_part(os, ls, d);
        continue;
      }
      attend(qs.data(), os.data(), ls.data(), rep, tp + i * maxb + k0 / bs, k1 - k0,
             head_cache(k_cache, v_cache, g), static_cast<float>(scale), scores, acc);
    }
  });
  merge_splits(op, lp, splits, n * h, d);
  return {out[0], lse[0]};
}

std::vector<at::Tensor> paged_prefix(
    const at::Tensor& q,        // [M, H, D] float32: every query token of the group
    const at::Tensor& k_cache,  // [KVH, NB, BS, D] float32
    const at::Tensor& v_cache,
    const at::Tensor& blocks,   // [NB'] int64: the shared prefix's blocks
    int64_t nkeys,              // keys in the prefix (the first nkeys slots of its blocks)
    double scale) {
  check_inputs(q, k_cache, v_cache);
  auto qc = q.contiguous();
  auto bc = blocks.contiguous();
  const int64_t m = qc.size(0), h = qc.size(1), d = qc.size(2);
  const int64_t kvh = k_cache.size(0), bs = k_cache.size(2), rep = h / kvh;
  TORCH_CHECK(bc.dim() == 1 && nkeys >= 1 && nkeys <= bc.size(0) * bs, "paged_prefix: key count out of range");
  auto out = at::empty({m, h, d}, qc.options());
  auto lse = at::empty({m, h}, qc.options());
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t chunks = (m + PREFIX_CHUNK - 1) / PREFIX_CHUNK;
  apar::parallel_range(0, chunks * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc;
    std::vector<const float*> qs;
    std::vector<float*> os, ls;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t c = w / kvh, g = w % kvh;
      qs.clear(), os.clear(), ls.clear();
      for (int64_t j = c * PREFIX_CHUNK; j < std::min(m, (c + 1) * PREFIX_CHUNK); ++j)
        for (int64_t r = 0; r < rep; ++r) {
          const int64_t head = j * h + g * rep + r;
          qs.push_back(qp + head * d);
          os.push_back(op + head * d);
          ls.push_back(lp + head);
        }
      attend(qs.data(), os.data(), ls.data(), static_cast<int64_t>(qs.size()), bc.data_ptr<int64_t>(), nkeys,
             head_cache(k_cache, v_cache, g), static_cast<float>(scale), scores, acc);
    }
  });
  return {out, lse};
}

// Merges attention over a second, disjoint key set into rows of the first, in place:
// out[rows[i]], lse[rows[i]] <- the softmax over both key sets, from o[i], l[i] (cascade).
void merge_attention_(at::Tensor& out, at::Tensor& lse, const at::Tensor& rows, const at::Tensor& o,
                      const at::Tensor& l) {
  TORCH_CHECK(out.is_contiguous() && lse.is_contiguous() && out.scalar_type() == at::kFloat, "merge: bad out");
  auto oc = o.contiguous();
  auto lc = l.contiguous();
  auto rc = rows.contiguous();
  const int64_t m = oc.size(0), h = oc.size(1), d = oc.size(2), r = out.size(0);
  TORCH_CHECK(out.size(1) == h && out.size(2) == d && rc.numel() == m && lc.numel() == m * h, "merge: shapes");
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float* src = oc.data_ptr<float>();
  const float* sl = lc.data_ptr<float>();
  const int64_t* rp = rc.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(rp[i] >= 0 && rp[i] < r, "merge: row out of range");
    for (int64_t j = 0; j < h; ++j) {
      merge_one(op + (rp[i] * h + j) * d, lp + rp[i] * h + j, src + (i * h + j) * d, sl[i * h + j], d);
    }
  }
}
