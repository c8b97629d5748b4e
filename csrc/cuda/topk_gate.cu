// topk_gate: per tile of gate logits (a [rows, cols] GEMM output that stays in L2), relu and an
// exact warp-level k-selection merged into a running top-k per row, kept between tiles.
//
// One warp per row. The running top-k lives in shared memory as k slots of (order key, expert id);
// slot i belongs to lane i % 32, which keeps the minimum of its slots in registers, and the warp
// keeps the current k-th largest key (the threshold) and its slot. A tile is streamed 32 x 4
// logits at a time: one comparison with the threshold rejects almost every logit; each survivor
// replaces the minimum slot, after which only the owning lane rescans its slots and the warp
// re-reduces the 32 lane minima. The last tile sorts the slots (bitonic, descending) and writes
// values and int64 indices. Logits are compared as order-preserving unsigned keys with every NaN
// mapped to the largest key, so NaN ranks above +inf as in torch.topk; ties keep the earlier
// expert, which makes the selection deterministic.
#include <climits>

#include "common.cuh"

namespace mxd {
namespace detail {
namespace {

template <typename A> struct KeyOf { using type = uint32_t; };
template <> struct KeyOf<double> { using type = unsigned long long; };

__device__ __forceinline__ uint32_t order_key(float v) {
  if (isnan(v)) return 0xffffffffu;
  const uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long order_key(double v) {
  if (isnan(v)) return ~0ull;
  const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}
__device__ __forceinline__ double key_value(unsigned long long k) {
  return __longlong_as_double(
      static_cast<long long>((k & 0x8000000000000000ull) ? (k ^ 0x8000000000000000ull) : ~k));
}

template <typename A>
__device__ __forceinline__ A relu(A v) {
  return v > A(0) ? v : (isnan(v) ? v : A(0));
}

// Lexicographic minimum over the warp of (key, slot); every lane gets the result.
template <typename Key>
__device__ __forceinline__ void warp_argmin(Key& key, int& slot) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const Key k2 = __shfl_xor_sync(kFullMask, key, off);
    const int s2 = __shfl_xor_sync(kFullMask, slot, off);
    if (k2 < key || (k2 == key && s2 < slot)) {
      key = k2;
      slot = s2;
    }
  }
}

// Minimum of the slots lane, lane + 32, ... below k.
template <typename Key>
__device__ __forceinline__ void lane_min(const Key* keys, int k, int lane, Key& key, int& slot) {
  key = ~Key(0);
  slot = INT_MAX;
  for (int i = lane; i < k; i += kWarp) {
    if (keys[i] < key) {
      key = keys[i];
      slot = i;
    }
  }
}

constexpr int kTopkThreadsMax = 256;
constexpr int kTopkUnroll = 4;
constexpr int kTopkSmemBudget = 32 * 1024;

template <typename T>
__global__ void __launch_bounds__(kTopkThreadsMax)
topk_tile_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset, int k,
                 int kpad, typename KeyOf<Acc<T>>::type* __restrict__ state_keys, int32_t* __restrict__ state_ids,
                 bool first, bool last, T* __restrict__ values, int64_t* __restrict__ indices) {
  using A = Acc<T>;
  using Key = typename KeyOf<A>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (row >= rows) return;  // uniform across the warp; only warp-level synchronisation below
  Key* keys = reinterpret_cast<Key*>(smem) + static_cast<int64_t>(warp) * kpad;
  int32_t* ids = reinterpret_cast<int32_t*>(reinterpret_cast<Key*>(smem) + static_cast<int64_t>(warps) * kpad) +
                 static_cast<int64_t>(warp) * kpad;

  // Running state; an empty slot has key 0, below every relu output (whose keys are >= key(+0)).
  for (int i = lane; i < kpad; i += kWarp) {
    Key key = 0;
    int32_t id = i < k ? -1 : INT_MAX;
    if (i < k && !first) {
      key = state_keys[row * k + i];
      id = state_ids[row * k + i];
    }
    keys[i] = key;
    ids[i] = id;
  }
  __syncwarp();

  Key my_min;
  int my_slot;
  lane_min(keys, k, lane, my_min, my_slot);
  Key threshold = my_min;
  int min_slot = my_slot;
  warp_argmin(threshold, min_slot);

  const T* src = logits + row * ld;
  for (int64_t base = 0; base < cols; base += kWarp * kTopkUnroll) {
    Key cand[kTopkUnroll];
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const int64_t c = base + u * kWarp + lane;
      cand[u] = c < cols ? order_key(relu(to_acc(src[c]))) : Key(0);
    }
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      unsigned pending = __ballot_sync(kFullMask, cand[u] > threshold);
      while (pending != 0) {
        const int from = __ffs(pending) - 1;
        pending &= pending - 1;
        const Key key = __shfl_sync(kFullMask, cand[u], from);
        if (key > threshold) {  // the threshold may have risen since the ballot
          if (lane == (min_slot & (kWarp - 1))) {
            keys[min_slot] = key;
            ids[min_slot] = static_cast<int32_t>(col_offset + base + u * kWarp + from);
            lane_min(keys, k, lane, my_min, my_slot);
          }
          threshold = my_min;
          min_slot = my_slot;
          warp_argmin(threshold, min_slot);
        }
      }
    }
  }

  if (!last) {
    for (int i = lane; i < k; i += kWarp) {
      state_keys[row * k + i] = keys[i];
      state_ids[row * k + i] = ids[i];
    }
    return;
  }

  // Bitonic sort of the kpad slots: larger key first, then smaller expert id.
  __syncwarp();
  for (int size = 2; size <= kpad; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = lane; t < kpad / 2; t += kWarp) {
        const int i = 2 * t - (t & (stride - 1));
        const int j = i + stride;
        const Key ki = keys[i], kj = keys[j];
        const int32_t ii = ids[i], ij = ids[j];
        const bool j_first = kj > ki || (kj == ki && ij < ii);
        const bool i_first = ki > kj || (ki == kj && ii < ij);
        if ((i & size) == 0 ? j_first : i_first) {
          keys[i] = kj;
          keys[j] = ki;
          ids[i] = ij;
          ids[j] = ii;
        }
      }
      __syncwarp();
    }
  }
  for (int i = lane; i < k; i += kWarp) {
    values[row * k + i] = from_acc<T>(key_value(keys[i]));
    indices[row * k + i] = ids[i];
  }
}

int next_pow2(int k) {
  int p = 1;
  while (p < k) p <<= 1;
  return p;
}

}  // namespace
}  // namespace detail

using namespace detail;

size_t topk_state_bytes_per_row(DType dtype, int k) {
  const size_t key_bytes = dtype == DType::kFloat64 ? 8 : 4;
  return static_cast<size_t>(k) * (key_bytes + 4);
}

cudaError_t topk_gate_tile(DType dtype, const void* logits, int64_t rows, int64_t cols, int64_t ld,
                           int64_t col_offset, int k, void* state, bool first, bool last, void* values,
                           int64_t* indices, cudaStream_t stream) {
  if (k < 1 || k > kTopkMaxK) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Key = typename KeyOf<Acc<T>>::type;
    const int kpad = next_pow2(k);
    const int per_warp = kpad * static_cast<int>(sizeof(Key) + sizeof(int32_t));
    int warps = kTopkSmemBudget / per_warp;
    if (warps > kTopkThreadsMax / kWarp) warps = kTopkThreadsMax / kWarp;
    if (warps < 1) warps = 1;
    Key* state_keys = static_cast<Key*>(state);
    int32_t* state_ids = state_keys == nullptr ? nullptr : reinterpret_cast<int32_t*>(state_keys + rows * k);
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, warps)));
    topk_tile_kernel<T><<<grid, warps * kWarp, static_cast<size_t>(warps) * per_warp, stream>>>(
        static_cast<const T*>(logits), rows, cols, ld, col_offset, k, kpad, state_keys, state_ids, first, last,
        static_cast<T*>(values), indices);
    return cudaGetLastError();
  });
}

}  // namespace mxd
