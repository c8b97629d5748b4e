// gather_combine: y[b] = sum_j values[b, j] * weight[indices[b, j]], and the K-sparse pieces of the
// backward passes of all three ops: gathered dot products, a deterministic reverse index (stable
// radix sort of the selected indices) and the row reductions built on it.
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"

namespace mxd {
namespace detail {
namespace {

// ---- forward: plain store epilogue ----------------------------------------------------------

template <typename T>
struct StoreEpi {
  T* out;
  int64_t row_stride;
  template <int VEC>
  __device__ __forceinline__ void operator()(int64_t b, int64_t c, const Acc<T> (&acc)[VEC]) const {
    VecIO<T, VEC>::store(out + b * row_stride + c, acc);
  }
};

// ---- gathered dot products: one warp per (token, run of selected entries) --------------------

constexpr int kDotThreads = 256;

template <typename T, int VEC, bool SCALE>
__global__ void __launch_bounds__(kDotThreads)
gathered_dot_kernel(const T* __restrict__ table, int64_t table_stride, int64_t D, Selection sel,
                    const T* __restrict__ dense, int64_t dense_stride, const T* __restrict__ scale,
                    int64_t scale_stride, int64_t j_per_warp, T* __restrict__ out) {
  using A = Acc<T>;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kDotThreads / kWarp) + (threadIdx.x / kWarp);
  if (b >= sel.B) return;
  const int64_t j_begin = static_cast<int64_t>(blockIdx.y) * j_per_warp;
  const int64_t j_end = j_begin + j_per_warp < sel.K ? j_begin + j_per_warp : sel.K;
  const T* g = dense + b * dense_stride;
  const T* s = SCALE ? scale + b * scale_stride : nullptr;
  for (int64_t j = j_begin; j < j_end; ++j) {
    const int64_t r = sel.indices[b * sel.K + j];
    A dot = A(0);
    if (r >= 0 && r < sel.N) {
      const T* e = table + r * table_stride;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += kWarp * VEC) {
        A ev[VEC], gv[VEC];
        VecIO<T, VEC>::load(e + c, ev);
        VecIO<T, VEC>::load(g + c, gv);
        if constexpr (SCALE) {
          A sv[VEC];
          VecIO<T, VEC>::load(s + c, sv);
#pragma unroll
          for (int i = 0; i < VEC; ++i) dot += ev[i] * (gv[i] * sv[i]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) dot += ev[i] * gv[i];
        }
      }
    }
    dot = warp_sum(dot);
    if (lane == 0) out[b * sel.K + j] = from_acc<T>(dot);
  }
}

// ---- reverse index ------------------------------------------------------------------------

// Sort keys: the index, or N for an index outside [0, N) (sorted after every row).
__global__ void reverse_index_keys_kernel(const int64_t* __restrict__ indices, int64_t total, int64_t N,
                                          uint32_t* __restrict__ keys, int32_t* __restrict__ positions) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = indices[p];
    keys[p] = static_cast<uint32_t>(r >= 0 && r < N ? r : N);
    positions[p] = static_cast<int32_t>(p);
  }
}

// row_ptr[n] = first position of the sorted keys that is >= n, for n in [0, N].
__global__ void reverse_index_row_ptr_kernel(const uint32_t* __restrict__ sorted, int64_t total, int64_t N,
                                             int32_t* __restrict__ row_ptr) {
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; n <= N;
       n += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = total;
    while (lo < hi) {
      const int64_t mid = (lo + hi) >> 1;
      if (static_cast<int64_t>(sorted[mid]) < n) lo = mid + 1; else hi = mid;
    }
    row_ptr[n] = static_cast<int32_t>(lo);
  }
}

int key_bits(int64_t N) {  // bits holding every key in [0, N]
  int bits = 1;
  while (bits < 32 && (static_cast<uint64_t>(N) >> bits) != 0) ++bits;
  return bits;
}

size_t align256(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }

// ---- row reductions over the reverse index: one warp per (row, column slice) ----------------

// 4 blocks of 256 threads per SM (at most 64 registers): without this target ptxas squeezes the
// float64 variants into 32 registers and spills.
constexpr int kRowThreads = 256;

template <typename T, int VEC, bool SCALE>
__global__ void __launch_bounds__(kRowThreads, 4)
scatter_rows_kernel(const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ entries, Selection sel,
                    const T* __restrict__ dense, int64_t dense_stride, const T* __restrict__ scale,
                    int64_t scale_stride, int64_t D, int64_t cols_per_warp, T* __restrict__ out) {
  using A = Acc<T>;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + (threadIdx.x / kWarp);
  if (n >= sel.N) return;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * cols_per_warp;
  const int64_t c_end = c_begin + cols_per_warp < D ? c_begin + cols_per_warp : D;
  // 64-bit positions: e0 + lane and e0 + kWarp may pass 2^31 - 1 when B * K is near it
  const int64_t e_begin = row_ptr[n];
  const int64_t e_end = row_ptr[n + 1];
  const int32_t K = static_cast<int32_t>(sel.K);

  for (int64_t base = c_begin; base < c_end; base += kWarp * VEC) {
    const int64_t c = base + static_cast<int64_t>(lane) * VEC;
    const bool active = c < c_end;
    A acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = A(0);
    for (int64_t e0 = e_begin; e0 < e_end; e0 += kWarp) {
      long long token = -1;
      A coef = A(0);
      if (e0 + lane < e_end) {
        const int32_t p = entries[e0 + lane];
        long long row;
        load_entry<T>(sel, p, row, coef);
        token = row >= 0 ? static_cast<long long>(p / K) : -1LL;
      }
      const int cnt = e_end - e0 < kWarp ? static_cast<int>(e_end - e0) : kWarp;
#pragma unroll 4
      for (int t = 0; t < cnt; ++t) {
        const long long b = __shfl_sync(kFullMask, token, t);
        const A w = __shfl_sync(kFullMask, coef, t);
        if (b >= 0 && active) {
          A d[VEC];
          VecIO<T, VEC>::load(dense + b * dense_stride + c, d);
          if constexpr (SCALE) {
            A s[VEC];
            VecIO<T, VEC>::load(scale + b * scale_stride + c, s);
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += w * (d[i] * s[i]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += w * d[i];
          }
        }
      }
    }
    if (active) VecIO<T, VEC>::store(out + n * D + c, acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads, 4)
scatter_sum_kernel(const int32_t* __restrict__ row_ptr, const int32_t* __restrict__ entries, Selection sel,
                   T* __restrict__ out) {
  using A = Acc<T>;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + (threadIdx.x / kWarp);
  if (n >= sel.N) return;
  A sum = A(0);
  const int64_t e_end = row_ptr[n + 1];
  for (int64_t e = static_cast<int64_t>(row_ptr[n]) + lane; e < e_end; e += kWarp) {
    long long row;
    A coef;
    load_entry<T>(sel, entries[e], row, coef);
    sum += coef;
  }
  sum = warp_sum(sum);
  if (lane == 0) out[n] = from_acc<T>(sum);
}

}  // namespace
}  // namespace detail

using namespace detail;

cudaError_t gather_combine(DType dtype, Matrix table, int64_t D, const Selection& sel, void* out,
                           int64_t out_row_stride, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = D % vec16<T>() == 0 && aligned16(table.data, table.row_stride, sizeof(T)) &&
                     aligned16(out, out_row_stride, sizeof(T));
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      return launch_gather<T, VEC>(static_cast<const T*>(table.data), table.row_stride, D, sel,
                                   StoreEpi<T>{static_cast<T*>(out), out_row_stride}, stream);
    });
  });
}

cudaError_t gathered_dot(DType dtype, Matrix table, int64_t D, const Selection& sel, Matrix dense, Matrix scale,
                         void* out, cudaStream_t stream) {
  if (sel.B == 0 || sel.K == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = D % vec16<T>() == 0 && aligned16(table.data, table.row_stride, sizeof(T)) &&
                     aligned16(dense.data, dense.row_stride, sizeof(T)) &&
                     aligned16(scale.data, scale.row_stride, sizeof(T));
    int64_t splits = ceil_div(target_warps(), sel.B);
    if (splits > sel.K) splits = sel.K;
    if (splits > 65535) splits = 65535;
    if (splits < 1) splits = 1;
    const int64_t j_per_warp = ceil_div(sel.K, splits);
    const dim3 grid(static_cast<unsigned>(ceil_div(sel.B, kDotThreads / kWarp)),
                    static_cast<unsigned>(ceil_div(sel.K, j_per_warp)));
    const T* table_p = static_cast<const T*>(table.data);
    const T* dense_p = static_cast<const T*>(dense.data);
    const T* scale_p = static_cast<const T*>(scale.data);
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      if (scale_p != nullptr) {
        gathered_dot_kernel<T, VEC, true><<<grid, kDotThreads, 0, stream>>>(
            table_p, table.row_stride, D, sel, dense_p, dense.row_stride, scale_p, scale.row_stride, j_per_warp,
            static_cast<T*>(out));
      } else {
        gathered_dot_kernel<T, VEC, false><<<grid, kDotThreads, 0, stream>>>(
            table_p, table.row_stride, D, sel, dense_p, dense.row_stride, nullptr, 0, j_per_warp,
            static_cast<T*>(out));
      }
      return cudaGetLastError();
    });
  });
}

size_t reverse_index_workspace_bytes(int64_t total, int64_t N) {
  size_t sort_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, static_cast<const uint32_t*>(nullptr),
                                  static_cast<uint32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(total), 0, key_bits(N));
  const size_t ints = align256(static_cast<size_t>(total) * 4);
  return 3 * ints + align256(sort_bytes);
}

cudaError_t build_reverse_index(const int64_t* indices, int64_t total, int64_t N, int32_t* row_ptr,
                                int32_t* entries, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  const size_t ints = align256(static_cast<size_t>(total) * 4);
  char* ws = static_cast<char*>(workspace);
  uint32_t* keys_in = reinterpret_cast<uint32_t*>(ws);
  uint32_t* keys_out = reinterpret_cast<uint32_t*>(ws + ints);
  int32_t* positions = reinterpret_cast<int32_t*>(ws + 2 * ints);
  if (total > 0) {
    if (workspace_bytes < 3 * ints) return cudaErrorInvalidValue;
    size_t sort_bytes = workspace_bytes - 3 * ints;
    const int64_t blocks = ceil_div(total, 256) < 65536 ? ceil_div(total, 256) : 65536;
    reverse_index_keys_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(indices, total, N, keys_in,
                                                                                positions);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    err = cub::DeviceRadixSort::SortPairs(ws + 3 * ints, sort_bytes, keys_in, keys_out, positions, entries,
                                          static_cast<int>(total), 0, key_bits(N), stream);
    if (err != cudaSuccess) return err;
  }
  const int64_t blocks = ceil_div(N + 1, 256) < 65536 ? ceil_div(N + 1, 256) : 65536;
  reverse_index_row_ptr_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(keys_out, total, N, row_ptr);
  return cudaGetLastError();
}

cudaError_t scatter_rows(DType dtype, const int32_t* row_ptr, const int32_t* entries, const Selection& sel,
                         Matrix dense, Matrix scale, int64_t D, void* out, cudaStream_t stream) {
  if (sel.N == 0 || D == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = D % vec16<T>() == 0 && aligned16(dense.data, dense.row_stride, sizeof(T)) &&
                     aligned16(scale.data, scale.row_stride, sizeof(T)) && aligned16(out, D, sizeof(T));
    const T* dense_p = static_cast<const T*>(dense.data);
    const T* scale_p = static_cast<const T*>(scale.data);
    return dispatch_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      // One pass (32 * VEC columns) per warp, so that a row selected by many tokens is spread over
      // D / (32 * VEC) warps; wider slices only when the grid would be too tall.
      int64_t cols_per_warp = static_cast<int64_t>(kWarp) * VEC;
      while (ceil_div(D, cols_per_warp) > 65535) cols_per_warp *= 2;
      const dim3 grid(static_cast<unsigned>(ceil_div(sel.N, kRowThreads / kWarp)),
                      static_cast<unsigned>(ceil_div(D, cols_per_warp)));
      if (scale_p != nullptr) {
        scatter_rows_kernel<T, VEC, true><<<grid, kRowThreads, 0, stream>>>(
            row_ptr, entries, sel, dense_p, dense.row_stride, scale_p, scale.row_stride, D, cols_per_warp,
            static_cast<T*>(out));
      } else {
        scatter_rows_kernel<T, VEC, false><<<grid, kRowThreads, 0, stream>>>(
            row_ptr, entries, sel, dense_p, dense.row_stride, nullptr, 0, D, cols_per_warp, static_cast<T*>(out));
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t scatter_sum(DType dtype, const int32_t* row_ptr, const int32_t* entries, const Selection& sel,
                        void* out, cudaStream_t stream) {
  if (sel.N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(static_cast<unsigned>(ceil_div(sel.N, kRowThreads / kWarp)));
    scatter_sum_kernel<T><<<grid, kRowThreads, 0, stream>>>(row_ptr, entries, sel, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

}  // namespace mxd
