// Torch binding of mxd_decode: y = (z @ decoder) * gather_combine(experts, values, indices) + bias.
//
// Forward: cuBLAS writes h = z @ decoder straight into y; one kernel then gathers the selected
// expert rows per token and turns y into h * (a C) + bias in place.
// Backward: grad_h = grad_y * (a C) by the same gather, then dz and ddecoder by cuBLAS; h is
// recomputed by cuBLAS (it is not kept between the passes) for dexperts (row reductions over the
// reverse index, deterministic) and dvalues (gathered dot products with grad_y * h).
#include <torch/library.h>

#include "binding_utils.h"

namespace mxd_binding {
namespace {

void check_decode_inputs(const at::Tensor& z, const at::Tensor& decoder, const at::Tensor& experts,
                         const at::Tensor& values, const at::Tensor& indices) {
  check_dim(z, "z", 2);
  check_dim(decoder, "decoder", 2);
  check_dim(experts, "experts", 2);
  TORCH_CHECK_VALUE(z.is_cuda(), "mxd_fast cuda backend: z must be a CUDA tensor, got device ", z.device());
  check_float_like(decoder, "decoder", z, "z");
  check_float_like(experts, "experts", z, "z");
  dtype_of(z);
  check_selection(values, indices, z, "z");
  TORCH_CHECK_VALUE(decoder.size(0) == z.size(1), "mxd_fast cuda backend: decoder must have shape [", z.size(1),
              ", O], got ", decoder.sizes());
  TORCH_CHECK_VALUE(experts.size(1) == decoder.size(1), "mxd_fast cuda backend: experts must have shape [N, ",
              decoder.size(1), "], got ", experts.sizes());
  TORCH_CHECK_VALUE(values.size(0) == z.size(0), "mxd_fast cuda backend: values must have ", z.size(0), " rows, got ",
              values.sizes());
}

at::Tensor mxd_decode_forward(const at::Tensor& z, const at::Tensor& decoder, const at::Tensor& experts,
                              const at::Tensor& values, const at::Tensor& indices,
                              const c10::optional<at::Tensor>& bias) {
  check_decode_inputs(z, decoder, experts, values, indices);
  const int64_t B = z.size(0), N = experts.size(0), O = decoder.size(1);
  at::Tensor b;
  if (bias.has_value()) {
    check_dim(*bias, "bias", 1);
    check_float_like(*bias, "bias", z, "z");
    TORCH_CHECK_VALUE(bias->size(0) == O, "mxd_fast cuda backend: bias must have shape [", O, "], got ", bias->sizes());
    b = bias->contiguous();
  }
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = new_empty({B, O}, z.options());
  if (B == 0 || O == 0) return y;
  at::mm_out(y, z, decoder);  // h, overwritten in place by the kernel
  const at::Tensor e = unit_columns(experts);
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  check_launch(mxd::mxd_decode_combine(dtype_of(z), matrix(e), O, selection(v, nullptr, idx, N), y.data_ptr(), O,
                                       b.defined() ? b.data_ptr() : nullptr, current_stream()),
               "mxd_decode_combine");
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mxd_decode_backward(
    const at::Tensor& grad_y, const at::Tensor& z, const at::Tensor& decoder, const at::Tensor& experts,
    const at::Tensor& values, const at::Tensor& indices, bool need_z, bool need_decoder, bool need_experts,
    bool need_values, bool need_bias, bool /*deterministic: always, no atomics*/) {
  check_decode_inputs(z, decoder, experts, values, indices);
  check_dim(grad_y, "grad_y", 2);
  check_float_like(grad_y, "grad_y", z, "z");
  const int64_t B = z.size(0), H = z.size(1), N = experts.size(0), O = decoder.size(1), K = values.size(1);
  TORCH_CHECK_VALUE(grad_y.size(0) == B && grad_y.size(1) == O, "mxd_fast cuda backend: grad_y must have shape [", B,
              ", ", O, "], got ", grad_y.sizes());
  const c10::cuda::CUDAGuard guard(z.device());
  const mxd::DType dt = dtype_of(z);
  const cudaStream_t stream = current_stream();
  const at::Tensor gy = unit_columns(grad_y);
  const at::Tensor e = unit_columns(experts);
  const at::Tensor v = values.contiguous(), idx = indices.contiguous();
  const mxd::Selection sel = selection(v, nullptr, idx, N);

  at::Tensor dz = placeholder(z), ddecoder = placeholder(z), dexperts = placeholder(z), dvalues = placeholder(z),
             dbias = placeholder(z);
  if (need_z || need_decoder) {
    at::Tensor grad_h = at::empty({B, O}, z.options());
    check_launch(mxd::mxd_decode_grad_h(dt, matrix(e), O, sel, matrix(gy), grad_h.data_ptr(), O, stream),
                 "mxd_decode_grad_h");
    if (need_z) {
      dz = new_empty({B, H}, z.options());
      at::mm_out(dz, grad_h, decoder.t());
    }
    if (need_decoder) {
      ddecoder = new_empty({H, O}, z.options());
      at::mm_out(ddecoder, z.t(), grad_h);
    }
  }
  if (need_experts || need_values) {
    const at::Tensor h = at::mm(z, decoder);  // contiguous [B, O]
    if (need_experts) {
      dexperts = new_empty({N, O}, z.options());
      const ReverseIndex ri = reverse_index(idx, N);
      check_launch(mxd::scatter_rows(dt, ri.row_ptr.data_ptr<int32_t>(), ri.entries.data_ptr<int32_t>(), sel,
                                     matrix(gy), matrix(h), O, dexperts.data_ptr(), stream),
                   "scatter_rows");
    }
    if (need_values) {
      dvalues = new_empty({B, K}, z.options());
      if (O == 0) dvalues.zero_();
      else check_launch(mxd::gathered_dot(dt, matrix(e), O, sel, matrix(gy), matrix(h), dvalues.data_ptr(), stream),
                        "gathered_dot");
    }
  }
  if (need_bias) {
    dbias = new_empty({O}, z.options());
    at::sum_out(dbias, grad_y, {0});
  }
  return {dz, ddecoder, dexperts, dvalues, dbias};
}

}  // namespace
}  // namespace mxd_binding

TORCH_LIBRARY_IMPL(mxd_fast_cuda, CUDA, m) {
  m.impl("mxd_decode_forward", &mxd_binding::mxd_decode_forward);
  m.impl("mxd_decode_backward", &mxd_binding::mxd_decode_backward);
}
