// Schemas of the mxd_fast_cuda ops (the kernel contract of every mxd_fast backend) and the
// module init that makes `import mxd_fast._C_cuda` register them. The CUDA implementations are
// registered next to each binding (topk_gate.cpp, gather_combine.cpp, mxd_decode.cpp); the CPU
// dispatch key gets a kernel that rejects CPU tensors with a ValueError naming the argument.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
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

namespace {

// The ops run on CUDA tensors only. A call whose tensors are all on the CPU (a mix with CUDA tensors
// dispatches to the CUDA kernels, which check devices) raises ValueError naming the first CPU
// tensor argument, rather than the dispatcher's NotImplementedError.
void reject_cpu_tensors(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const auto& arguments = schema.arguments();
  const auto inputs = torch::jit::last(*stack, arguments.size());
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (inputs[i].isTensor() && !inputs[i].toTensor().is_cuda()) {
      TORCH_CHECK_VALUE(false, "mxd_fast cuda backend: ", arguments[i].name(), " must be a CUDA tensor, got device ",
                        inputs[i].toTensor().device(), " (", schema.name(), ")");
    }
  }
  TORCH_CHECK_VALUE(false, "mxd_fast cuda backend: ", schema.name(), " runs on CUDA tensors only");
}

}  // namespace

TORCH_LIBRARY_IMPL(mxd_fast_cuda, CPU, m) {
  for (const char* name : {"topk_gate_forward", "topk_gate_backward", "gather_combine_forward",
                           "gather_combine_backward", "mxd_decode_forward", "mxd_decode_backward"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&reject_cpu_tensors>());
  }
}

// The ops register when the shared library loads; the module itself is empty.
extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr,
                                          nullptr,               nullptr,   nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
