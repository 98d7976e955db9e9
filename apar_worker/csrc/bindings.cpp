// The Python module of the engine's CPU kernels (apar_worker/native.py builds it).
#include "ops.h"

// The kernels that run for long (a linear, a layer, attention) release the GIL, as torch's own
// ops do: the engine steps in its own thread, and a replica's event loop (streams, load reports)
// would otherwise wait on every call, or hold the GIL while the step waits up to the 5 ms
// switch interval for it.
using nogil = py::call_guard<py::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over the paged KV cache (CPU, float32)", nogil());
  m.def("paged_prefix", &paged_prefix, "a group's queries over its shared prefix blocks (CPU, float32)", nogil());
  m.def("merge_attention_", &merge_attention_, "merge attention over a disjoint key set into rows, in place");
  m.def("add_rms_norm_", &add_rms_norm_, "residual += delta; RMSNorm(residual) * weight (CPU, float32)");
  m.def("rope_", &rope_, "rotary embedding in place, half-split layout (CPU, float32)");
  m.def("write_kv_", &write_kv_, "K and V rows [T, KVH, D] into their cache slots (CPU, float32)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up (CPU, float32)");
  m.def("argmax_rows", &argmax_rows, "each row's first largest value's index, as torch.argmax(-1) (CPU, float32)");
  m.def("fma_peak_gflops", &fma_peak_gflops, "GFLOP/s of FMA (bf16: VDPBF16PS) chains on every torch thread (peak.cpp)",
        nogil());
  m.def("pack_panels", &pack_panels, "a float32 or int8 [N, K] weight as [N/16, K, 16] panels");
  m.def("amx_available", &amx_available, "whether this CPU and kernel grant AMX int8 tiles (amx_linear.cpp)");
  m.def("pack_panels_amx", &pack_panels_amx, "an int8 (float32) [N, K] weight as AMX int8 (bfloat16 hi/lo) B tiles");
  m.def("bf16_rows_available", &bf16_rows_available, "whether int8 layers may take bfloat16 rows (AVX512_BF16)");
  m.def("pack_panels_pairs", &pack_panels_pairs, "an int8 [N, K] weight as [N/16, K/2, 32] k-pair panels");
  m.def("skinny_linear", &skinny_linear, "x [M, K] times packed panels (x scales if int8), + bias (CPU)",
        py::arg("x"), py::arg("panels"), py::arg("n"), py::arg("bias") = py::none(), py::arg("scales") = py::none(),
        nogil());
  m.def("decoder_layer", &decoder_layer, "one Llama decoder layer of an all-decode step (lean_layer.cpp)", nogil());
}
