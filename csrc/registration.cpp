// Schemas of the mxd_fast_cuda ops (the kernel contract of every mxd_fast backend) and the
// module init that makes `import mxd_fast._C_cuda` register them. The CUDA implementations are
// registered next to each binding (topk_gate.cpp, gather_combine.cpp, mxd_decode.cpp).
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(mxd_fast_cuda, m) {
  m.def("topk_gate_forward(Tensor x, Tensor weight, Tensor? bias, int k) -> (Tensor, Tensor)");
  m.def(
      "topk_gate_backward(Tensor grad_values, Tensor x, Tensor weight, Tensor values, Tensor indices, "
      "bool need_x, bool need_weight, bool need_bias, bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def("gather_combine_forward(Tensor weight, Tensor values, Tensor indices) -> Tensor");
  m.def(
      "gather_combine_backward(Tensor grad_y, Tensor weight, Tensor values, Tensor indices, bool need_weight, "
      "bool need_values, bool deterministic) -> (Tensor, Tensor)");
  m.def(
      "mxd_decode_forward(Tensor z, Tensor decoder, Tensor experts, Tensor values, Tensor indices, "
      "Tensor? bias) -> Tensor");
  m.def(
      "mxd_decode_backward(Tensor grad_y, Tensor z, Tensor decoder, Tensor experts, Tensor values, "
      "Tensor indices, bool need_z, bool need_decoder, bool need_experts, bool need_values, bool need_bias, "
      "bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// The ops register when the shared library loads; the module itself is empty.
extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr,
                                          nullptr,               nullptr,   nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
