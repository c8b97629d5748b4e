// topk_gate: per tile of gate logits (a [rows, cols] GEMM output that stays in L2), relu and an
// exact warp-level k-selection merged into a running top-k per row, kept between tiles.
//
// One warp per row. Entries are ranked in one total order: a larger logit first, then the smaller
// expert id (ties keep the earlier expert), so the selection is exact and deterministic whatever
// order the logits are visited in. Logits are compared as order-preserving unsigned keys with
// every NaN mapped to the largest key, so NaN ranks above +inf as in torch.topk.
// The running top-k lives in shared memory as k slots of (key, expert id); slot i belongs to lane
// i % 32, which keeps the worst of its slots in registers, and the warp keeps the worst of all k
// (the threshold) and its slot. A row is read in passes of 32 lanes x kTopkLoads 16-byte loads
// (1024 bf16 logits; scalar loads where a row is not 16-byte aligned), all in flight at once; one
// comparison with the threshold rejects almost every logit, and a pass without a survivor costs one
// vote. A few survivors are inserted one at a time, one vote finding each: it replaces the worst slot,
// after which only the owning lane rescans its slots, the warp re-reduces the 32 lane minima and
// every lane drops the survivors the risen threshold now rejects. A pass with more
// than kTopkMergeAt survivors (the first passes of a row, where one-at-a-time insertion would cost
// hundreds of warp reductions) is merged at once by a warp-wide radix selection over the slots and
// the pass (merge_pass). The last tile sorts the slots (bitonic, descending) and writes values and
// int64 indices.
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

// Whether (k1, i1) ranks above (k2, i2): a larger key, or an equal key and a smaller id. Ids compare
// as unsigned, so an empty slot's id (-1) loses to every expert.
template <typename Key>
__device__ __forceinline__ bool ranks_above(Key k1, uint32_t i1, Key k2, uint32_t i2) {
  return k1 > k2 || (k1 == k2 && i1 < i2);
}

// The lowest-ranked of the k slots, over the warp: every lane gets its key, id and slot. Lanes
// without a slot enter the highest rank and slot INT_MAX; equal ranks (empty slots) keep the
// smaller slot.
template <typename Key>
__device__ __forceinline__ void warp_lowest(Key& key, uint32_t& id, int& slot) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const Key k2 = __shfl_xor_sync(kFullMask, key, off);
    const uint32_t i2 = __shfl_xor_sync(kFullMask, id, off);
    const int s2 = __shfl_xor_sync(kFullMask, slot, off);
    if (ranks_above(key, id, k2, i2) || (k2 == key && i2 == id && s2 < slot)) {
      key = k2;
      id = i2;
      slot = s2;
    }
  }
}

// The lowest-ranked of the slots lane, lane + 32, ... below k.
template <typename Key>
__device__ __forceinline__ void lane_lowest(const Key* keys, const int32_t* ids, int k, int lane, Key& key,
                                            uint32_t& id, int& slot) {
  key = ~Key(0);
  id = 0;
  slot = INT_MAX;
  for (int i = lane; i < k; i += kWarp) {
    const uint32_t id_i = static_cast<uint32_t>(ids[i]);
    if (slot == INT_MAX || ranks_above(key, id, keys[i], id_i)) {
      key = keys[i];
      id = id_i;
      slot = i;
    }
  }
}

template <typename A>
__device__ __forceinline__ typename KeyOf<A>::type logit_key(A v) {
  return order_key(relu(v));
}

// cand[i] for a runtime i, by selection in registers (indexing would put cand in local memory).
template <typename Key, int M>
__device__ __forceinline__ Key pick(const Key (&cand)[M], int i) {
  Key out = cand[0];
#pragma unroll
  for (int j = 1; j < M; ++j) out = i == j ? cand[j] : out;
  return out;
}

// Offset of lane's cand[i] from the pass's first expert: lane l holds the logits base + (u * 32 + l) *
// VEC + v of the pass as cand[u * VEC + v].
template <int VEC>
__device__ __forceinline__ uint32_t entry_offset(int lane, int i) {
  return static_cast<uint32_t>(((i / VEC) * kWarp + lane) * VEC + i % VEC);
}

// Bit i set where cand[i] (expert first_id + entry_offset(0, i)) ranks above (key, id).
template <int VEC, typename Key, int M>
__device__ __forceinline__ uint32_t above_mask(const Key (&cand)[M], uint32_t first_id, Key key, uint32_t id) {
  uint32_t mask = 0;
#pragma unroll
  for (int i = 0; i < M; ++i) {
    if (ranks_above(cand[i], first_id + entry_offset<VEC>(0, i), key, id)) mask |= 1u << i;
  }
  return mask;
}

// Calls f(key, id) for every entry of the union of the running top-k (its non-empty slots) and
// the pass's logits in range that this lane holds: cand[i] (bit i of `valid` set) is the logit of
// expert first_id + entry_offset(0, i), first_id being this lane's first.
template <int VEC, typename Key, int M, class F>
__device__ __forceinline__ void for_each_entry(const Key (&cand)[M], uint32_t valid, uint32_t first_id,
                                               const Key* keys, const int32_t* ids, int k, int lane, F&& f) {
  for (int i = lane; i < k; i += kWarp) {
    if (ids[i] != -1) f(keys[i], static_cast<uint32_t>(ids[i]));
  }
#pragma unroll
  for (int i = 0; i < M; ++i) {
    if (valid & (1u << i)) f(cand[i], first_id + entry_offset<VEC>(0, i));
  }
}

// The running top-k becomes the top-k of itself and the whole pass at once, for a pass with many
// candidates (the first passes of a row): radix selection of the k-th largest key over the warp (one
// warp-wide count per key bit), then, where several entries share it, of the id that completes k;
// the kept entries are compacted into the staging slots and copied back.
template <int VEC, typename Key, int M>
__device__ __forceinline__ void merge_pass(const Key (&cand)[M], uint32_t valid, uint32_t first_id, Key* keys,
                                           int32_t* ids, Key* stage_keys, int32_t* stage_ids, int k, int lane) {
  auto count = [&](auto&& pred) {
    int n = 0;
    for_each_entry<VEC>(cand, valid, first_id, keys, ids, k, lane,
                        [&](Key key, uint32_t id) { n += pred(key, id) ? 1 : 0; });
    return warp_sum(n);
  };
  const int entries = count([](Key, uint32_t) { return true; });
  bool all = entries <= k;
  Key kth = 0;
  uint32_t kth_id = ~0u;
  if (!all) {
    Key prefix = 0, high = 0;
    int above = 0;  // entries whose key is above the prefix's range
    for (int bit = static_cast<int>(sizeof(Key)) * 8 - 1; bit >= 0; --bit) {
      const Key m = high | (Key(1) << bit), want = prefix | (Key(1) << bit);
      const int n = count([&](Key key, uint32_t) { return (key & m) == want; });
      if (above + n >= k) prefix = want;
      else above += n;
      high = m;
    }
    kth = prefix;
    const int need = k - above;  // of the entries whose key is kth, the `need` smallest ids stay
    if (count([&](Key key, uint32_t) { return key == kth; }) > need) {
      uint32_t id_prefix = 0, id_high = 0;
      int below = 0;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t m = id_high | (1u << bit);
        const int n = count([&](Key key, uint32_t id) { return key == kth && (id & m) == id_prefix; });
        if (below + n < need) {
          below += n;
          id_prefix |= 1u << bit;
        }
        id_high = m;
      }
      kth_id = id_prefix;
    }
  }
  auto kept = [&](Key key, uint32_t id) { return all || key > kth || (key == kth && id <= kth_id); };

  int mine = 0;
  for_each_entry<VEC>(cand, valid, first_id, keys, ids, k, lane,
                      [&](Key key, uint32_t id) { mine += kept(key, id) ? 1 : 0; });
  int end = mine;  // inclusive prefix sum over the lanes
#pragma unroll
  for (int off = 1; off < kWarp; off <<= 1) {
    const int t = __shfl_up_sync(kFullMask, end, off);
    if (lane >= off) end += t;
  }
  int pos = end - mine;
  for_each_entry<VEC>(cand, valid, first_id, keys, ids, k, lane, [&](Key key, uint32_t id) {
    if (kept(key, id)) {
      stage_keys[pos] = key;
      stage_ids[pos] = static_cast<int32_t>(id);
      ++pos;
    }
  });
  const int total = __shfl_sync(kFullMask, end, kWarp - 1);  // min(entries, k)
  __syncwarp();
  for (int i = lane; i < k; i += kWarp) {
    keys[i] = i < total ? stage_keys[i] : Key(0);
    ids[i] = i < total ? stage_ids[i] : -1;
  }
  __syncwarp();
}

constexpr int kTopkThreadsMax = 256;
constexpr int kTopkMergeAt = 32;  // candidates in a pass above which it is merged at once
constexpr int kTopkLoads = 4;  // loads in flight per lane and pass
constexpr int kTopkSmemBudget = 32 * 1024;

// VEC: logits per load (16 bytes' worth, or 1 where rows are not 16-byte aligned). Launched with at
// most kTopkThreadsMax threads; no __launch_bounds__: with it ptxas (CUDA 13.0) spills where without
// it the kernel takes at most 127 registers (two 256-thread blocks per SM) and spills nothing.
template <typename T, int VEC>
__global__ void topk_tile_kernel(const T* __restrict__ logits, int64_t rows, int64_t cols, int64_t ld,
                                 int64_t col_offset, int k, int kpad,
                                 typename KeyOf<Acc<T>>::type* __restrict__ state_keys,
                                 int32_t* __restrict__ state_ids, bool first, bool last, T* __restrict__ values,
                                 int64_t* __restrict__ indices) {
  using Key = typename KeyOf<Acc<T>>::type;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warps = blockDim.x / kWarp;
  const int warp = threadIdx.x / kWarp;
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * warps + warp;
  if (row >= rows) return;  // uniform across the warp; only warp-level synchronisation below
  // Shared memory: [slot keys | staged keys] (Key) then [slot ids | staged ids] (int32), kpad per warp each.
  Key* keys = reinterpret_cast<Key*>(smem) + static_cast<int64_t>(warp) * kpad;
  Key* stage_keys = keys + static_cast<int64_t>(warps) * kpad;
  int32_t* ids = reinterpret_cast<int32_t*>(reinterpret_cast<Key*>(smem) + static_cast<int64_t>(2 * warps) * kpad) +
                 static_cast<int64_t>(warp) * kpad;
  int32_t* stage_ids = ids + static_cast<int64_t>(warps) * kpad;

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

  Key my_key;
  uint32_t my_id;
  int my_slot;
  lane_lowest(keys, ids, k, lane, my_key, my_id, my_slot);
  Key threshold = my_key;
  uint32_t threshold_id = my_id;
  int low_slot = my_slot;
  warp_lowest(threshold, threshold_id, low_slot);

  const T* src = logits + row * ld;
  constexpr int kLoads = VEC == 1 ? 2 * kTopkLoads : kTopkLoads;  // scalar loads: more of them
  constexpr int kPerLane = kLoads * VEC;
  constexpr int64_t kPass = static_cast<int64_t>(kWarp) * kPerLane;
  static_assert(kPerLane <= 32, "one bit of `valid` per logit");
  for (int64_t base = 0; base < cols; base += kPass) {
    // Lane l holds the logits base + (u * 32 + l) * VEC + v of load u, as cand[u * VEC + v].
    Key cand[kPerLane];
    uint32_t valid = 0;  // bit i: cand[i] is in range
#pragma unroll
    for (int u = 0; u < kLoads; ++u) {
      const int64_t c0 = base + static_cast<int64_t>(u * kWarp + lane) * VEC;
      if (VEC > 1 && c0 + VEC <= cols) {
        Acc<T> vals[VEC];
        VecIO<T, VEC>::load(src + c0, vals);
#pragma unroll
        for (int v = 0; v < VEC; ++v) cand[u * VEC + v] = logit_key(vals[v]);
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) cand[u * VEC + v] = c0 + v < cols ? logit_key(to_acc(src[c0 + v])) : Key(0);
      }
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if (c0 + v < cols) valid |= 1u << (u * VEC + v);
      }
    }
    // Expert ids fit in 32 bits (N < 2^31 - 1).
    const uint32_t first_id = static_cast<uint32_t>(col_offset + base + lane * VEC);
    uint32_t pending = valid & above_mask<VEC>(cand, first_id, threshold, threshold_id);  // candidates
    if (!__any_sync(kFullMask, pending != 0)) continue;  // the common case once the threshold has risen
    if (warp_sum(__popc(pending)) > kTopkMergeAt) {
      merge_pass<VEC>(cand, valid, first_id, keys, ids, stage_keys, stage_ids, k, lane);
      lane_lowest(keys, ids, k, lane, my_key, my_id, my_slot);
      threshold = my_key;
      threshold_id = my_id;
      low_slot = my_slot;
      warp_lowest(threshold, threshold_id, low_slot);
      continue;
    }

    // A few candidates, one at a time in any order (the ranking is total): a vote finds a lane with one,
    // two shuffles broadcast it; each insertion raises the threshold, and every lane then drops the
    // candidates that no longer rank above it without communicating, so every one offered is inserted.
    for (;;) {
      const unsigned lanes = __ballot_sync(kFullMask, pending != 0);
      if (lanes == 0) break;
      const int from = __ffs(lanes) - 1;
      const int i = __shfl_sync(kFullMask, __ffs(pending) - 1, from);
      if (lane == from) pending &= pending - 1;
      const Key key = __shfl_sync(kFullMask, pick(cand, i), from);
      const uint32_t id = static_cast<uint32_t>(col_offset + base) + entry_offset<VEC>(from, i);
      if (lane == (low_slot & (kWarp - 1))) {
        keys[low_slot] = key;
        ids[low_slot] = static_cast<int32_t>(id);
        lane_lowest(keys, ids, k, lane, my_key, my_id, my_slot);
      }
      threshold = my_key;
      threshold_id = my_id;
      low_slot = my_slot;
      warp_lowest(threshold, threshold_id, low_slot);
      pending &= above_mask<VEC>(cand, first_id, threshold, threshold_id);
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
    const int per_warp = 2 * kpad * static_cast<int>(sizeof(Key) + sizeof(int32_t));  // slots and staging
    int warps = kTopkSmemBudget / per_warp;
    if (warps > kTopkThreadsMax / kWarp) warps = kTopkThreadsMax / kWarp;
    if (warps < 1) warps = 1;
    Key* state_keys = static_cast<Key*>(state);
    int32_t* state_ids = state_keys == nullptr ? nullptr : reinterpret_cast<int32_t*>(state_keys + rows * k);
    const dim3 grid(static_cast<unsigned>(ceil_div(rows, warps)));
    const size_t smem = static_cast<size_t>(warps) * per_warp;
    dispatch_vec<T>(aligned16(logits, ld, sizeof(T)), [&](auto vec) {
      topk_tile_kernel<T, decltype(vec)::value><<<grid, warps * kWarp, smem, stream>>>(
          static_cast<const T*>(logits), rows, cols, ld, col_offset, k, kpad, state_keys, state_ids, first, last,
          static_cast<T*>(values), indices);
      return cudaSuccess;
    });
    return cudaGetLastError();
  });
}

}  // namespace mxd
