// Kernels that check the warp emulator itself: a correct warp reduction and vote, and the two
// mistakes it must report instead of hanging or guessing (a full-mask collective in a warp some of
// whose threads exited; a barrier no thread can pass).
#include "warp_emulator.h"

namespace {

__global__ void warp_sums(const int* in, int* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int v = in[t];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const unsigned odd = __ballot_sync(0xffffffffu, in[t] % 2 != 0);
  out[t] = v + 1000 * __popc(odd) + 100000 * __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 31);
}

__global__ void shuffle_after_exit(const int*, int* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

__global__ void mismatched_barriers(const int*, int* out) {
  if (threadIdx.x % 32 == 0) __syncthreads();
  else __syncwarp();
  out[threadIdx.x] = 1;
}

}  // namespace

extern "C" int emu_selftest(int which, const int* in, int* out, int blocks, int threads, char* error,
                            int error_bytes) {
  emu::begin_call();
  void (*kernels[])(const int*, int*) = {warp_sums, shuffle_after_exit, mismatched_barriers};
  emu::Launcher(blocks, threads)(kernels[which], in, out);
  return emu::end_call(cudaGetLastError(), error, error_bytes);
}

// Warp collectives (shuffles, votes) executed since the last reset: a count of the warp-synchronous
// steps a kernel's logic takes, for comparing kernels on the CPU (not a time).
extern "C" uint64_t emu_collective_count(int reset) {
  const uint64_t n = emu::g_collectives;
  if (reset) emu::g_collectives = 0;
  return n;
}
