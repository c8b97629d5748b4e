// Helpers shared by the torch bindings of the CUDA kernels: checks, dtype mapping, output
// allocation, stride normalisation and the reverse index of a selection. Bad arguments raise what
// the Python side of mxd_fast raises: ValueError (shape, device, size) or TypeError (dtype), naming
// the argument; a failed kernel launch raises RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdlib>
#include <cstring>
#include <limits>

#include "cuda/mxd_kernels.h"

namespace mxd_binding {

inline mxd::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return mxd::DType::kFloat32;
    case at::kHalf: return mxd::DType::kFloat16;
    case at::kBFloat16: return mxd::DType::kBFloat16;
    case at::kDouble: return mxd::DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "mxd_fast cuda backend: unsupported dtype ", t.scalar_type(),
                  " (supported: float32, float16, bfloat16, float64)");
  }
  return mxd::DType::kFloat32;  // not reached
}

inline void check_on(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "mxd_fast cuda backend: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.device() == like.device(), "mxd_fast cuda backend: ", name, " is on ", t.device(), " but ", like_name,
              " is on ", like.device());
}

inline void check_float_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  check_on(t, name, like, like_name);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "mxd_fast cuda backend: ", name, " has dtype ",
              t.scalar_type(), " but ", like_name, " has dtype ", like.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, "mxd_fast cuda backend: ", name, " must have ", dim, " dimension(s), got shape ",
              t.sizes());
}

// A selection's values/indices pair: [B, K] each, indices int64, values floating like `like`.
inline void check_selection(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& like,
                            const char* like_name) {
  check_dim(values, "values", 2);
  check_dim(indices, "indices", 2);
  check_float_like(values, "values", like, like_name);
  check_on(indices, "indices", like, like_name);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "mxd_fast cuda backend: indices must be int64, got ",
              indices.scalar_type());
  TORCH_CHECK_VALUE(values.sizes() == indices.sizes(), "mxd_fast cuda backend: values and indices must have the same shape, got ",
              values.sizes(), " and ", indices.sizes());
}

// Outputs are poisoned (NaN, or -1 for integers) when MXD_FAST_POISON=1, so that an element a
// kernel fails to write shows up in the tests.
inline at::Tensor new_empty(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor out = at::empty(shape, options);
  const char* flag = std::getenv("MXD_FAST_POISON");
  if (flag != nullptr && std::strcmp(flag, "1") == 0) {
    if (at::isFloatingType(out.scalar_type())) out.fill_(std::numeric_limits<double>::quiet_NaN());
    else out.fill_(-1);
  }
  return out;
}

inline at::Tensor placeholder(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A 2-D tensor whose columns are unit-strided (any row stride, 0 included), copying only if needed.
inline at::Tensor unit_columns(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

inline mxd::Matrix matrix(const at::Tensor& t) { return mxd::Matrix{t.data_ptr(), t.stride(0)}; }

inline mxd::Matrix no_matrix() { return mxd::Matrix{nullptr, 0}; }

// values, mask and indices must be contiguous [B, K].
inline mxd::Selection selection(const at::Tensor& values, const at::Tensor* mask, const at::Tensor& indices,
                                int64_t N) {
  return mxd::Selection{values.data_ptr(), mask == nullptr ? nullptr : mask->data_ptr(),
                        indices.data_ptr<int64_t>(), values.size(0), values.size(1), N};
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "mxd_fast cuda backend: ", what, " failed: ", cudaGetErrorString(err));
}

// The reverse index of a contiguous [B, K] int64 index tensor (see mxd::build_reverse_index).
struct ReverseIndex {
  at::Tensor row_ptr;  // [N + 1] int32
  at::Tensor entries;  // [B * K] int32
};

inline ReverseIndex reverse_index(const at::Tensor& indices, int64_t N) {
  const int64_t total = indices.numel();
  TORCH_CHECK_VALUE(total < std::numeric_limits<int32_t>::max() && N < std::numeric_limits<int32_t>::max() - 1,
              "mxd_fast cuda backend: the reverse index needs B * K < 2^31 - 1 and N < 2^31 - 2, got B * K = ",
              total, ", N = ", N);
  const auto int_options = indices.options().dtype(at::kInt);
  ReverseIndex ri{at::empty({N + 1}, int_options), at::empty({total}, int_options)};
  const size_t bytes = total > 0 ? mxd::reverse_index_workspace_bytes(total, N) : 0;
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, indices.options().dtype(at::kByte));
  check_launch(mxd::build_reverse_index(indices.data_ptr<int64_t>(), total, N, ri.row_ptr.data_ptr<int32_t>(),
                                        ri.entries.data_ptr<int32_t>(), bytes > 0 ? workspace.data_ptr() : nullptr,
                                        bytes, current_stream()),
               "build_reverse_index");
  return ri;
}

}  // namespace mxd_binding
