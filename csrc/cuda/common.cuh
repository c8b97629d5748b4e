// Building blocks shared by the mxd_fast kernels: number types, 16-byte vector access, warp
// reductions, the coefficient of a selected entry, and the one-warp-per-token gather kernel
// (an embedding-bag with a pluggable epilogue) that gather_combine and mxd_decode instantiate.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "mxd_kernels.h"

namespace mxd {
namespace detail {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- number types --------------------------------------------------------------------------

// Accumulation type: float, double for double data.
template <typename T> struct Num { using Acc = float; };
template <> struct Num<double> { using Acc = double; };
template <typename T> using Acc = typename Num<T>::Acc;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(Acc<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Elements of T in 16 bytes: the vector width of the vectorised kernels.
template <typename T> constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

// VEC consecutive elements: one 16-byte access when VEC * sizeof(T) == 16, else VEC == 1.
template <typename T, int VEC>
struct VecIO {
  static_assert(VEC == 1 || VEC * sizeof(T) == 16, "VEC must be 1 or fill 16 bytes");

  __device__ __forceinline__ static void load(const T* __restrict__ p, Acc<T> (&out)[VEC]) {
    if constexpr (VEC == 1) {
      out[0] = to_acc(p[0]);
    } else {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = to_acc(e[i]);
    }
  }

  // For data the same kernel overwrites afterwards (not through the read-only cache).
  __device__ __forceinline__ static void load_rw(const T* p, Acc<T> (&out)[VEC]) {
    if constexpr (VEC == 1) {
      out[0] = to_acc(p[0]);
    } else {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < VEC; ++i) out[i] = to_acc(e[i]);
    }
  }

  __device__ __forceinline__ static void store(T* __restrict__ p, const Acc<T> (&in)[VEC]) {
    if constexpr (VEC == 1) {
      p[0] = from_acc<T>(in[0]);
    } else {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < VEC; ++i) e[i] = from_acc<T>(in[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    }
  }
};

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// ---- selected entries ----------------------------------------------------------------------

// The row an entry reads and its coefficient. An index outside [0, N) gives row -1 (never
// dereferenced, contributes nothing). The relu mask zeroes the coefficient where mask <= 0 (a NaN
// passes, as in torch.relu's gradient). It only zeroes the coefficient: the row is still
// read, so that 0 * NaN = NaN propagates exactly as in the torch backend.
template <typename T>
__device__ __forceinline__ void load_entry(const Selection& sel, int64_t p, long long& row, Acc<T>& coef) {
  const int64_t r = sel.indices[p];
  coef = to_acc(static_cast<const T*>(sel.values)[p]);
  if (sel.mask != nullptr && to_acc(static_cast<const T*>(sel.mask)[p]) <= Acc<T>(0)) coef = Acc<T>(0);
  const bool valid = r >= 0 && r < sel.N;
  row = valid ? static_cast<long long>(r) : -1LL;
  if (!valid) coef = Acc<T>(0);
}

// ---- the gather kernel: one warp per (token, column slice) ---------------------------------
//
// acc[c] = sum_j coeff[b, j] * table[indices[b, j], c] in Acc, then epi(b, c, acc) for each lane's
// VEC consecutive columns c. The K (index, coefficient) pairs are read 32 at a time, one per lane,
// and broadcast with shuffles; each lane then issues one VEC-wide load per selected row.
constexpr int kGatherThreads = 256;

template <typename T, int VEC, class Epi>
__global__ void __launch_bounds__(kGatherThreads)
gather_kernel(const T* __restrict__ table, int64_t table_stride, int64_t D, Selection sel,
              int64_t cols_per_warp, Epi epi) {
  using A = Acc<T>;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kGatherThreads / kWarp) + (threadIdx.x / kWarp);
  if (b >= sel.B) return;  // uniform across the warp
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * cols_per_warp;
  const int64_t c_end = c_begin + cols_per_warp < D ? c_begin + cols_per_warp : D;
  const int64_t p0 = b * sel.K;

  for (int64_t base = c_begin; base < c_end; base += kWarp * VEC) {
    const int64_t c = base + static_cast<int64_t>(lane) * VEC;
    const bool active = c < c_end;
    A acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = A(0);
    for (int64_t j0 = 0; j0 < sel.K; j0 += kWarp) {
      long long row = -1;
      A coef = A(0);
      if (j0 + lane < sel.K) load_entry<T>(sel, p0 + j0 + lane, row, coef);
      const int n = sel.K - j0 < kWarp ? static_cast<int>(sel.K - j0) : kWarp;
#pragma unroll 4
      for (int t = 0; t < n; ++t) {
        const long long r = __shfl_sync(kFullMask, row, t);
        const A w = __shfl_sync(kFullMask, coef, t);
        if (r >= 0 && active) {
          A e[VEC];
          VecIO<T, VEC>::load(table + r * table_stride + c, e);
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += w * e[i];
        }
      }
    }
    if (active) epi(b, c, acc);
  }
}

// ---- host helpers ----------------------------------------------------------------------------

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Warps that keep the current device busy (a few per scheduler).
inline int64_t target_warps() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    (void)cudaGetLastError();
    sms = 108;
  }
  return static_cast<int64_t>(sms) * 48;
}

// A matrix can be read VEC-wide when its base and row stride are 16-byte aligned (width checked
// separately). Row stride 0 (a broadcast row) qualifies.
inline bool aligned16(const void* p, int64_t row_stride, size_t elem_bytes) {
  return p == nullptr ||
         (reinterpret_cast<uintptr_t>(p) % 16 == 0 && (static_cast<uint64_t>(row_stride) * elem_bytes) % 16 == 0);
}

// f(T{}) with T the element type of dtype.
template <class F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, VEC>{}) with VEC = vec16<T>() when vectorised access is possible, else 1.
template <typename T, class F>
cudaError_t dispatch_vec(bool vectorise, F&& f) {
  if (vectorise) return f(std::integral_constant<int, vec16<T>()>{});
  return f(std::integral_constant<int, 1>{});
}

// Launches gather_kernel over sel.B tokens and D columns; the columns of a token are split over
// several warps only when there are too few tokens to fill the device.
template <typename T, int VEC, class Epi>
cudaError_t launch_gather(const T* table, int64_t table_stride, int64_t D, const Selection& sel, Epi epi,
                          cudaStream_t stream) {
  if (sel.B == 0 || D == 0) return cudaSuccess;
  constexpr int64_t kPass = static_cast<int64_t>(kWarp) * VEC;
  const int64_t passes = ceil_div(D, kPass);
  int64_t splits = ceil_div(target_warps(), sel.B);
  if (splits > passes) splits = passes;
  if (splits < 1) splits = 1;
  const int64_t cols_per_warp = ceil_div(passes, splits) * kPass;
  const dim3 grid(static_cast<unsigned>(ceil_div(sel.B, kGatherThreads / kWarp)),
                  static_cast<unsigned>(ceil_div(D, cols_per_warp)));
  gather_kernel<T, VEC, Epi><<<grid, kGatherThreads, 0, stream>>>(table, table_stride, D, sel, cols_per_warp, epi);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace mxd
