// Torch binding of gather_combine: y[b] = sum_j values[b, j] * weight[indices[b, j]].
#include <torch/library.h>

#include "binding_utils.h"

namespace mxd_binding {
namespace {

void check_inputs(const at::Tensor& weight, const at::Tensor& values, const at::Tensor& indices) {
  check_dim(weight, "weight", 2);
  TORCH_CHECK_VALUE(weight.is_cuda(), "mxd_fast cuda backend: weight must be a CUDA tensor, got device ", weight.device());
  check_selection(values, indices, weight, "weight");
  dtype_of(weight);
}

at::Tensor gather_combine_forward(const at::Tensor& weight, const at::Tensor& values, const at::Tensor& indices) {
  check_inputs(weight, values, indices);
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t B = values.size(0), N = weight.size(0), O = weight.size(1);
  at::Tensor y = new_empty({B, O}, weight.options());
  if (B == 0 || O == 0) return y;
  const at::Tensor w = unit_columns(weight);
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  check_launch(mxd::gather_combine(dtype_of(weight), matrix(w), O, selection(v, nullptr, idx, N), y.data_ptr(), O,
                                   current_stream()),
               "gather_combine");
  return y;
}

std::tuple<at::Tensor, at::Tensor> gather_combine_backward(const at::Tensor& grad_y, const at::Tensor& weight,
                                                           const at::Tensor& values, const at::Tensor& indices,
                                                           bool need_weight, bool need_values,
                                                           bool /*deterministic: always, no atomics*/) {
  check_inputs(weight, values, indices);
  check_dim(grad_y, "grad_y", 2);
  check_float_like(grad_y, "grad_y", weight, "weight");
  const int64_t B = values.size(0), N = weight.size(0), O = weight.size(1);
  TORCH_CHECK_VALUE(grad_y.size(0) == B && grad_y.size(1) == O, "mxd_fast cuda backend: grad_y must have shape [", B, ", ",
              O, "], got ", grad_y.sizes());
  const c10::cuda::CUDAGuard guard(weight.device());
  const mxd::DType dt = dtype_of(weight);
  const cudaStream_t stream = current_stream();
  const at::Tensor gy = unit_columns(grad_y);
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  const mxd::Selection sel = selection(v, nullptr, idx, N);

  at::Tensor dweight = placeholder(weight), dvalues = placeholder(weight);
  if (need_weight) {
    dweight = new_empty({N, O}, weight.options());
    const ReverseIndex ri = reverse_index(idx, N);
    check_launch(mxd::scatter_rows(dt, ri.row_ptr.data_ptr<int32_t>(), ri.entries.data_ptr<int32_t>(), sel,
                                   matrix(gy), no_matrix(), O, dweight.data_ptr(), stream),
                 "scatter_rows");
  }
  if (need_values) {
    dvalues = new_empty({B, values.size(1)}, weight.options());
    const at::Tensor w = unit_columns(weight);
    if (O == 0) dvalues.zero_();
    else check_launch(mxd::gathered_dot(dt, matrix(w), O, sel, matrix(gy), no_matrix(), dvalues.data_ptr(), stream),
                      "gathered_dot");
  }
  return {dweight, dvalues};
}

}  // namespace
}  // namespace mxd_binding

TORCH_LIBRARY_IMPL(mxd_fast_cuda, CUDA, m) {
  m.impl("gather_combine_forward", &mxd_binding::gather_combine_forward);
  m.impl("gather_combine_backward", &mxd_binding::gather_combine_backward);
}
