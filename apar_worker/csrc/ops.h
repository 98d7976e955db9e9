// The engine's CPU kernels, as one set of declarations for the bindings and for the C++
// decoder layer (lean_layer.cpp), which calls them directly.
#pragma once
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& tables,
                                     const at::Tensor& nkeys, double scale);
std::vector<at::Tensor> paged_prefix(const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& blocks, int64_t nkeys,
                                     double scale);
void merge_attention_(at::Tensor& out, at::Tensor& lse, const at::Tensor& rows, const at::Tensor& o,
                      const at::Tensor& l);
at::Tensor add_rms_norm_(at::Tensor& residual, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                         double eps);
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void write_kv_(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
               const at::Tensor& v);
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
at::Tensor argmax_rows(const at::Tensor& logits);
at::Tensor pack_panels(const at::Tensor& weight);
bool amx_available();
at::Tensor pack_panels_amx(const at::Tensor& weight);
at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, const float* bias,
                      const float* scales);
at::Tensor amx_float_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, const float* bias);
bool bf16_rows_available();
at::Tensor pack_panels_pairs(const at::Tensor& weight);
at::Tensor bf16_rows_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n, const float* bias,
                            const float* scales);
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& scales);
at::Tensor decoder_layer(at::Tensor& x, const c10::optional<at::Tensor>& delta, const std::vector<at::Tensor>& w,
                         const std::vector<int64_t>& dims, double eps, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                         const c10::optional<at::Tensor>& tok, const at::Tensor& tables, const at::Tensor& nkeys,
                         const std::vector<at::Tensor>& groups, const std::vector<int64_t>& group_keys,
                         double scale);
double fma_peak_gflops(bool bf16);
