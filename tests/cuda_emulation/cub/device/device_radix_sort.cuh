// Stand-in for CUB's DeviceRadixSort under the warp emulator: a stable sort of the pairs by the
// key bits [begin_bit, end_bit), on the host (what CUB's LSD radix sort computes).
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace cub {

struct DeviceRadixSort {
  template <typename K, typename V>
  static cudaError_t SortPairs(void* temp, size_t& temp_bytes, const K* keys_in, K* keys_out, const V* values_in,
                               V* values_out, int n, int begin_bit = 0, int end_bit = sizeof(K) * 8,
                               cudaStream_t = nullptr) {
    if (temp == nullptr) {
      temp_bytes = 16;
      return cudaSuccess;
    }
    const int width = end_bit - begin_bit;
    const K mask = width >= static_cast<int>(sizeof(K) * 8) ? ~K(0) : static_cast<K>((K(1) << width) - 1);
    auto bits = [&](int i) { return static_cast<K>((keys_in[i] >> begin_bit) & mask); };
    std::vector<int> order(static_cast<size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return bits(a) < bits(b); });
    std::vector<K> keys(static_cast<size_t>(n));
    std::vector<V> values(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
      keys[i] = keys_in[order[i]];
      values[i] = values_in[order[i]];
    }
    std::copy(keys.begin(), keys.end(), keys_out);
    std::copy(values.begin(), values.end(), values_out);
    return cudaSuccess;
  }
};

}  // namespace cub
