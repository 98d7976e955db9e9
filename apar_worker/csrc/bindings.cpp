// The Python module of the engine's CPU kernels (apar_worker/native.py builds it).
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
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up);
at::Tensor pack_panels(const at::Tensor& weight);
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& panels, int64_t n,
                         const c10::optional<at::Tensor>& bias);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache (CPU, float32)");
  m.def("paged_prefix", &paged_prefix, "a group's queries over its shared prefix blocks (CPU, float32)");
  m.def("merge_attention_", &merge_attention_, "merge attention over a disjoint key set into rows, in place");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += delta; RMSNorm(residual) * weight (CPU, float32)");
  m.def("rope_", &rope_, "rotary embedding in place, half-split layout (CPU, float32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up (CPU, float32)");
  m.def("pack_panels", &pack_panels, "a float32 [N, K] weight as [N/16, K, 16] panels");
  m.def("skinny_linear", &skinny_linear, "x [M, K] times packed panels, + bias (CPU, float32)");
}
