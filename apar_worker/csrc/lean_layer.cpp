// One Llama decoder layer of a step whose every query token is a native attention item
// (decode rows and drafts, no prefill), for the lean forward (apar_worker/lean_forward.py).
// It makes the calls that file's Python loop makes per layer, minus some thirty torch ops
// of dispatch (~150 us a layer on SmolLM2: a third of an int8 1-token step).
#include "ops.h"

namespace {

// w[i..i+2]: panels, bias, scales of one native linear; empty tensors where absent
at::Tensor linear(const at::Tensor& x, const std::vector<at::Tensor>& w, size_t i, int64_t n) {
  const c10::optional<at::Tensor> bias = w[i + 1].numel() ? c10::optional<at::Tensor>(w[i + 1]) : c10::nullopt;
  const c10::optional<at::Tensor> scales = w[i + 2].numel() ? c10::optional<at::Tensor>(w[i + 2]) : c10::nullopt;
  return skinny_linear(x, w[i], n, bias, scales);
}

}  // namespace

// x [T, hidden]: the residual stream, updated in place (+= delta, += attention); returns the
// MLP's output, the next layer's delta. w: input norm, q/k/v (panels, bias, scales), o (3),
// post-attention norm, gate/up (3), down (3). dims: heads, kv heads, head dim, intermediate.
// groups: per cascade group its query tokens, prefix blocks and rows (3 tensors each).
at::Tensor decoder_layer(at::Tensor& x, const c10::optional<at::Tensor>& delta, const std::vector<at::Tensor>& w,
                         const std::vector<int64_t>& dims, double eps, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& tok, const at::Tensor& tables, const at::Tensor& nkeys,
                         const std::vector<at::Tensor>& groups, const std::vector<int64_t>& group_keys,
                         double scale) {
  TORCH_CHECK(w.size() == 14 && dims.size() == 4, "decoder_layer: 14 weights and 4 dims");
  TORCH_CHECK(groups.size() == 3 * group_keys.size(), "decoder_layer: 3 tensors per group");
  const int64_t t = x.size(0), hidden = x.size(1), heads = dims[0], kvh = dims[1], d = dims[2], inter = dims[3];
  const int64_t nq = heads * d, nkv = kvh * d;
  at::Tensor h = add_rms_norm_(x, delta, w[0], eps);
  const at::Tensor qkv = linear(h, w, 1, nq + 2 * nkv);
  at::Tensor q = qkv.narrow(1, 0, nq).view({t, heads, d});
  at::Tensor k = qkv.narrow(1, nq, nkv).view({t, kvh, d});
  const at::Tensor v = qkv.narrow(1, nq + nkv, nkv).view({t, kvh, d});
  rope_(q, cos, sin);
  rope_(k, cos, sin);
  write_kv_(k_cache, v_cache, slots, k, v);
  const at::Tensor qn = tok.has_value() ? q.index_select(0, *tok) : q;
  auto res = paged_decode(qn, k_cache, v_cache, tables, nkeys, scale);
  at::Tensor o = res[0], lse = res[1];
  for (size_t g = 0; g < group_keys.size(); ++g) {
    auto part = paged_prefix(q.index_select(0, groups[3 * g]), k_cache, v_cache, groups[3 * g + 1],
                             group_keys[g], scale);
    merge_attention_(o, lse, groups[3 * g + 2], part[0], part[1]);
  }
  if (tok.has_value()) o = at::empty_like(o).index_copy_(0, *tok, o);
  const at::Tensor attn = linear(o.reshape({t, nq}), w, 4, hidden);
  h = add_rms_norm_(x, attn, w[7], eps);
  const at::Tensor gate_up = linear(h, w, 8, 2 * inter);
  const at::Tensor act = silu_mul(gate_up.narrow(1, 0, inter), gate_up.narrow(1, inter, inter));
  return linear(act, w, 11, hidden);
}
