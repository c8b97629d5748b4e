// C entry points to csrc/cuda/mxd_decode.cu's launchers under the warp emulator (see
// topk_gate_harness.cpp). A selection is passed as values, mask (or null), indices, B, K, N.
#include "warp_emulator.h"

#include "mxd_decode.cu"

extern "C" {

// y holds h = z @ decoder on entry.
int emu_mxd_decode_combine(int dtype, const void* experts, int64_t experts_stride, int64_t O, const void* values,
                           const void* mask, const int64_t* indices, int64_t B, int64_t K, int64_t N, void* y,
                           int64_t y_stride, const void* bias, char* error, int error_bytes) {
  emu::begin_call();
  const mxd::Selection sel{values, mask, indices, B, K, N};
  return emu::end_call(mxd::mxd_decode_combine(static_cast<mxd::DType>(dtype), {experts, experts_stride}, O, sel, y,
                                               y_stride, bias, nullptr),
                       error, error_bytes);
}

int emu_mxd_decode_grad_h(int dtype, const void* experts, int64_t experts_stride, int64_t O, const void* values,
                          const void* mask, const int64_t* indices, int64_t B, int64_t K, int64_t N,
                          const void* grad_y, int64_t grad_y_stride, void* grad_h, int64_t grad_h_stride, char* error,
                          int error_bytes) {
  emu::begin_call();
  const mxd::Selection sel{values, mask, indices, B, K, N};
  return emu::end_call(mxd::mxd_decode_grad_h(static_cast<mxd::DType>(dtype), {experts, experts_stride}, O, sel,
                                              {grad_y, grad_y_stride}, grad_h, grad_h_stride, nullptr),
                       error, error_bytes);
}

}  // extern "C"
