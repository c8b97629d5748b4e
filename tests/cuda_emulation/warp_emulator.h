// A CPU emulation of the CUDA execution model, enough to run mxd_fast's warp-synchronous kernels
// and their launchers on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber on one OS thread (started with makecontext, switched
// with _setjmp/_longjmp, which unlike swapcontext make no system call); blocks run one after
// another. A warp collective (__shfl*_sync, __ballot_sync, __any_sync, __syncwarp) and
// __syncthreads are barriers: a fiber arriving at one yields until every live thread of its warp
// (block) has arrived. Dynamic shared memory is filled with a garbage pattern before each block,
// so that reading it before writing it shows. A collective over an incomplete warp and a barrier no
// thread can pass (a deadlock) are reported as errors instead of hanging. Out-of-bounds accesses are
// not checked.
//
// Kernel sources are used unchanged but for two textual rewrites done by the test that compiles
// them (tests/test_cuda_emulated.py): `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `::emu::Launcher(grid, block, smem, stream)(kernel, args)` and `extern __shared__ T name[];`
// becomes `T* name = reinterpret_cast<T*>(::emu::dynamic_shared());`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  ucontext_t start;
  jmp_buf resume;
  uint3 thread_idx;
  bool started = false;
  bool done = false;
  bool waiting = false;
};

struct BlockState {
  std::vector<Fiber> fibers;
  std::vector<int> warp_live, warp_arrived;
  std::vector<int> warp_released;  // threads that passed each warp's last barrier
  std::vector<uint64_t> exchange;  // [warps][32] values of the collective in progress
  int block_live = 0, block_arrived = 0;
  int current = -1;
  jmp_buf scheduler;
  std::vector<unsigned char> shared;
  std::string error;
};

inline BlockState* g_block = nullptr;
inline uint3 g_thread_idx, g_block_idx;
inline dim3 g_block_dim, g_grid_dim;
inline std::function<void()> g_kernel_call;
inline std::string g_error;  // the first error of the last launch
inline uint64_t g_collectives = 0;  // warp collectives executed (counted once per warp)

// Fiber stacks, reused by every block (allocated once, never zero-filled: untouched pages cost nothing).
inline char* fiber_stack(int thread) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= thread) stacks.emplace_back(new char[kStackBytes]);
  return stacks[thread].get();
}

inline Fiber& self() { return g_block->fibers[g_block->current]; }
inline int warp_of(int tid) { return tid / kWarpSize; }

// Stops the calling fiber for good after an error; the scheduler ends the launch.
[[noreturn]] inline void fail(const std::string& message) {
  if (g_block->error.empty()) g_block->error = message;
  self().waiting = true;
  _longjmp(g_block->scheduler, 1);  // never resumed
}

inline void yield() {
  if (_setjmp(self().resume) == 0) _longjmp(g_block->scheduler, 1);
}

inline void release_warp(int w) {
  g_block->warp_released[w] = g_block->warp_arrived[w];
  for (int i = w * kWarpSize; i < static_cast<int>(g_block->fibers.size()) && i < (w + 1) * kWarpSize; ++i)
    g_block->fibers[i].waiting = false;
  g_block->warp_arrived[w] = 0;
}

inline void warp_barrier() {
  const int w = warp_of(g_block->current);
  if (++g_block->warp_arrived[w] == g_block->warp_live[w]) {
    release_warp(w);
  } else {
    self().waiting = true;
    yield();
  }
}

inline void release_block() {
  for (Fiber& f : g_block->fibers) f.waiting = false;
  g_block->block_arrived = 0;
}

inline void block_barrier() {
  if (++g_block->block_arrived == g_block->block_live) {
    release_block();
  } else {
    self().waiting = true;
    yield();
  }
}

inline void check_full(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + ": only the full mask is emulated");
  if (g_block->warp_live[warp_of(g_block->current)] != kWarpSize)
    fail(std::string(what) + " with a full mask in a warp some of whose threads exited");
}

// A full-mask collective's barrier must have been passed by all 32 threads of the warp.
inline void full_warp_barrier(const char* what) {
  warp_barrier();
  if (g_block->warp_released[warp_of(g_block->current)] != kWarpSize)
    fail(std::string(what) + " with a full mask in a warp some of whose threads exited");
}

// Every lane publishes `value`; read(lane) gives any lane's value until the closing barrier.
template <typename V, typename Read>
auto exchange(V value, Read read) {
  static_assert(sizeof(V) <= sizeof(uint64_t), "emulated shuffles carry at most 8 bytes");
  const int tid = g_block->current;
  if (tid % kWarpSize == 0) ++g_collectives;
  uint64_t& slot = g_block->exchange[tid];
  slot = 0;
  std::memcpy(&slot, &value, sizeof(V));
  full_warp_barrier("a warp collective");
  const uint64_t* lanes = &g_block->exchange[warp_of(tid) * kWarpSize];
  auto out = read(lanes);
  warp_barrier();
  return out;
}

template <typename V>
V from_bits(uint64_t bits) {
  V v;
  std::memcpy(&v, &bits, sizeof(V));
  return v;
}

template <typename V>
V shfl_sync(unsigned mask, V value, int src, int width = kWarpSize) {
  check_full(mask, "__shfl_sync");
  const int lane = g_block->current % kWarpSize;
  const int source = (lane / width) * width + (src % width);
  return exchange(value, [&](const uint64_t* lanes) { return from_bits<V>(lanes[source]); });
}

template <typename V>
V shfl_up_sync(unsigned mask, V value, unsigned delta, int width = kWarpSize) {
  check_full(mask, "__shfl_up_sync");
  const int lane = g_block->current % kWarpSize;
  const int source = lane % width >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane;
  return exchange(value, [&](const uint64_t* lanes) { return from_bits<V>(lanes[source]); });
}

template <typename V>
V shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = kWarpSize) {
  check_full(mask, "__shfl_xor_sync");
  const int lane = g_block->current % kWarpSize;
  int source = lane ^ lane_mask;
  if (source / width != lane / width) source = lane;
  return exchange(value, [&](const uint64_t* lanes) { return from_bits<V>(lanes[source]); });
}

inline unsigned ballot_sync(unsigned mask, bool predicate) {
  check_full(mask, "__ballot_sync");
  return exchange(static_cast<uint64_t>(predicate ? 1 : 0), [](const uint64_t* lanes) {
    unsigned bits = 0;
    for (int i = 0; i < kWarpSize; ++i) bits |= (lanes[i] ? 1u : 0u) << i;
    return bits;
  });
}

inline void syncwarp(unsigned mask = 0xffffffffu) {
  check_full(mask, "__syncwarp");
  full_warp_barrier("__syncwarp");
}

inline unsigned char* dynamic_shared() { return g_block->shared.data(); }

inline void fiber_main() {
  g_kernel_call();
  BlockState& b = *g_block;
  Fiber& f = self();
  f.done = true;
  const int w = warp_of(b.current);
  // Threads that exit no longer hold back their warp's or block's barrier.
  if (--b.warp_live[w] > 0 && b.warp_arrived[w] == b.warp_live[w]) release_warp(w);
  if (--b.block_live > 0 && b.block_arrived == b.block_live) release_block();
  _longjmp(b.scheduler, 1);
}

// Runs every thread of one block to completion; returns false with g_error set on an error.
inline bool run_block(BlockState& b) {
  g_block = &b;
  for (;;) {
    bool ran = false, all_done = true;
    for (size_t i = 0; i < b.fibers.size(); ++i) {
      Fiber& f = b.fibers[i];
      if (f.done) continue;
      all_done = false;
      if (f.waiting) continue;
      b.current = static_cast<int>(i);
      g_thread_idx = f.thread_idx;
      if (_setjmp(b.scheduler) == 0) {
        if (f.started) _longjmp(f.resume, 1);
        f.started = true;
        setcontext(&f.start);
      }
      ran = true;
      if (!b.error.empty()) break;
    }
    if (!b.error.empty()) {
      g_error = b.error;
      return false;
    }
    if (all_done) return true;
    if (!ran) {
      g_error = "deadlock: every live thread waits at a barrier that cannot complete";
      return false;
    }
  }
}

struct Launcher {
  dim3 grid, block;
  size_t shared_bytes;
  Launcher(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b), shared_bytes(smem) {}

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) {
    if (!g_error.empty()) return;  // an earlier launch failed
    g_grid_dim = grid;
    g_block_dim = block;
    g_kernel_call = [&]() { kernel(args...); };
    const int threads = static_cast<int>(block.x * block.y * block.z);
    const int warps = (threads + kWarpSize - 1) / kWarpSize;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          BlockState b;
          b.fibers.resize(threads);
          b.warp_live.assign(warps, 0);
          b.warp_arrived.assign(warps, 0);
          b.warp_released.assign(warps, 0);
          b.exchange.assign(static_cast<size_t>(warps) * kWarpSize, 0);
          b.block_live = threads;
          b.shared.assign(shared_bytes, 0xAB);
          g_block_idx = make_uint3(bx, by, bz);
          for (int t = 0; t < threads; ++t) {
            Fiber& f = b.fibers[t];
            f.thread_idx = make_uint3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            ++b.warp_live[warp_of(t)];
            getcontext(&f.start);
            f.start.uc_stack.ss_sp = fiber_stack(t);
            f.start.uc_stack.ss_size = kStackBytes;
            f.start.uc_link = nullptr;  // fiber_main never returns
            makecontext(&f.start, fiber_main, 0);
          }
          if (!run_block(b)) return;
        }
  }
};

// For the harnesses' C entry points: clears the error before a call, reports it after.
inline void begin_call() { g_error.clear(); }
inline int end_call(cudaError_t status, char* error, int error_bytes) {
  std::snprintf(error, static_cast<size_t>(error_bytes), "%s", g_error.c_str());
  return static_cast<int>(status);
}

inline cudaError_t get_last_error() { return g_error.empty() ? cudaSuccess : cudaErrorLaunchFailure; }
inline cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 4 : 0;
  return cudaSuccess;
}

// Bit casts and loads of the device intrinsics.
inline float uint_as_float(uint32_t u) { return from_bits<float>(u); }
inline uint32_t float_as_uint(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline double longlong_as_double(long long v) { return from_bits<double>(static_cast<uint64_t>(v)); }
inline long long double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, 8);
  return v;
}
inline double hiloint2double(int hi, int lo) {
  return from_bits<double>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo));
}
template <typename T>
T ldg(const T* p) {
  return *p;
}

}  // namespace emu

// The CUDA spellings, mapped onto the emulation.
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::emu::g_thread_idx)
#define blockIdx (::emu::g_block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
#define __shfl_sync ::emu::shfl_sync
#define __shfl_xor_sync ::emu::shfl_xor_sync
#define __shfl_up_sync ::emu::shfl_up_sync
#define __ballot_sync ::emu::ballot_sync
#define __any_sync(mask, pred) (::emu::ballot_sync((mask), (pred)) != 0u)
#define __all_sync(mask, pred) (::emu::ballot_sync((mask), (pred)) == (mask))
#define __syncwarp ::emu::syncwarp
#define __syncthreads ::emu::block_barrier
#define __ffs(x) __builtin_ffs(x)
#define __popc(x) __builtin_popcount(x)
#define __ldg ::emu::ldg
#define __uint_as_float ::emu::uint_as_float
#define __float_as_uint ::emu::float_as_uint
#define __longlong_as_double ::emu::longlong_as_double
#define __double_as_longlong ::emu::double_as_longlong
#define __hiloint2double ::emu::hiloint2double
#define cudaGetLastError ::emu::get_last_error
#define cudaGetDevice ::emu::get_device
#define cudaDeviceGetAttribute ::emu::device_get_attribute
using std::isnan;
