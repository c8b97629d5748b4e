// C entry points to csrc/cuda/gather_combine.cu's launchers under the warp emulator (see
// topk_gate_harness.cpp). A selection is passed as values, mask (or null), indices, B, K, N.
#include "warp_emulator.h"

#include "gather_combine.cu"

extern "C" {

int emu_gather_combine(int dtype, const void* table, int64_t table_stride, int64_t D, const void* values,
                       const void* mask, const int64_t* indices, int64_t B, int64_t K, int64_t N, void* out,
                       int64_t out_stride, char* error, int error_bytes) {
  emu::begin_call();
  const mxd::Selection sel{values, mask, indices, B, K, N};
  return emu::end_call(mxd::gather_combine(static_cast<mxd::DType>(dtype), {table, table_stride}, D, sel, out,
                                           out_stride, nullptr),
                       error, error_bytes);
}

int emu_gathered_dot(int dtype, const void* table, int64_t table_stride, int64_t D, const void* values,
                     const void* mask, const int64_t* indices, int64_t B, int64_t K, int64_t N, const void* dense,
                     int64_t dense_stride, const void* scale, int64_t scale_stride, void* out, char* error,
                     int error_bytes) {
  emu::begin_call();
  const mxd::Selection sel{values, mask, indices, B, K, N};
  return emu::end_call(mxd::gathered_dot(static_cast<mxd::DType>(dtype), {table, table_stride}, D, sel,
                                         {dense, dense_stride}, {scale, scale_stride}, out, nullptr),
                       error, error_bytes);
}

// The reverse index of indices [total] into row_ptr [N + 1] and entries [total].
int emu_reverse_index(const int64_t* indices, int64_t total, int64_t N, int32_t* row_ptr, int32_t* entries,
                      char* error, int error_bytes) {
  emu::begin_call();
  std::vector<unsigned char> workspace(mxd::reverse_index_workspace_bytes(total, N));
  return emu::end_call(mxd::build_reverse_index(indices, total, N, row_ptr, entries, workspace.data(),
                                                workspace.size(), nullptr),
                       error, error_bytes);
}

int emu_scatter_rows(int dtype, const int32_t* row_ptr, const int32_t* entries, const void* values, const void* mask,
                     const int64_t* indices, int64_t B, int64_t K, int64_t N, const void* dense, int64_t dense_stride,
                     const void* scale, int64_t scale_stride, int64_t D, void* out, char* error, int error_bytes) {
  emu::begin_call();
  const mxd::Selection sel{values, mask, indices, B, K, N};
  return emu::end_call(mxd::scatter_rows(static_cast<mxd::DType>(dtype), row_ptr, entries, sel,
                                         {dense, dense_stride}, {scale, scale_stride}, D, out, nullptr),
                       error, error_bytes);
}

int emu_scatter_sum(int dtype, const int32_t* row_ptr, const int32_t* entries, const void* values, const void* mask,
                    const int64_t* indices, int64_t B, int64_t K, int64_t N, void* out, char* error,
                    int error_bytes) {
  emu::begin_call();
  const mxd::Selection sel{values, mask, indices, B, K, N};
  return emu::end_call(mxd::scatter_sum(static_cast<mxd::DType>(dtype), row_ptr, entries, sel, out, nullptr),
                       error, error_bytes);
}

}  // extern "C"
