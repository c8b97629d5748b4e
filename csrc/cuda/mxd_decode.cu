// mxd_decode: y = (z @ decoder) * gather_combine(experts, values, indices) + bias. The GEMM is a
// library call made by the binding into y; the gathered expert rows are combined one warp per token
// and multiplied into it in place, so h = z @ decoder is read once and the combination never exists
// in memory. The backward pass reuses the same gather for grad_h = grad_y * (a C).
#include "common.cuh"

namespace mxd {
namespace detail {
namespace {

// y = h * acc + bias, in place over h.
template <typename T>
struct CombineEpi {
  T* y;
  int64_t row_stride;
  const T* bias;
  template <int VEC>
  __device__ __forceinline__ void operator()(int64_t b, int64_t c, Acc<T> (&acc)[VEC]) const {
    T* p = y + b * row_stride + c;
    Acc<T> h[VEC];
    VecIO<T, VEC>::load_rw(p, h);
    if (bias != nullptr) {
      Acc<T> bv[VEC];
      VecIO<T, VEC>::load(bias + c, bv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = h[i] * acc[i] + bv[i];
    } else {
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = h[i] * acc[i];
    }
    VecIO<T, VEC>::store(p, acc);
  }
};

// grad_h = grad_y * acc.
template <typename T>
struct GradHEpi {
  const T* grad_y;
  int64_t grad_y_stride;
  T* grad_h;
  int64_t grad_h_stride;
  template <int VEC>
  __device__ __forceinline__ void operator()(int64_t b, int64_t c, Acc<T> (&acc)[VEC]) const {
    Acc<T> g[VEC];
    VecIO<T, VEC>::load(grad_y + b * grad_y_stride + c, g);
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= g[i];
    VecIO<T, VEC>::store(grad_h + b * grad_h_stride + c, acc);
  }
};

}  // namespace
}  // namespace detail

using namespace detail;

cudaError_t mxd_decode_combine(DType dtype, Matrix experts, int64_t O, const Selection& sel, void* y,
                               int64_t y_row_stride, const void* bias, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = O % vec16<T>() == 0 && aligned16(experts.data, experts.row_stride, sizeof(T)) &&
                     aligned16(y, y_row_stride, sizeof(T)) && aligned16(bias, 0, sizeof(T));
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      return launch_gather<T, VEC>(static_cast<const T*>(experts.data), experts.row_stride, O, sel,
                                   CombineEpi<T>{static_cast<T*>(y), y_row_stride, static_cast<const T*>(bias)},
                                   stream);
    });
  });
}

cudaError_t mxd_decode_grad_h(DType dtype, Matrix experts, int64_t O, const Selection& sel, Matrix grad_y,
                              void* grad_h, int64_t grad_h_row_stride, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = O % vec16<T>() == 0 && aligned16(experts.data, experts.row_stride, sizeof(T)) &&
                     aligned16(grad_y.data, grad_y.row_stride, sizeof(T)) &&
                     aligned16(grad_h, grad_h_row_stride, sizeof(T));
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      return launch_gather<T, VEC>(
          static_cast<const T*>(experts.data), experts.row_stride, O, sel,
          GradHEpi<T>{static_cast<const T*>(grad_y.data), grad_y.row_stride, static_cast<T*>(grad_h),
                      grad_h_row_stride},
          stream);
    });
  });
}

}  // namespace mxd
