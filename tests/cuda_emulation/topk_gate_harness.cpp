// C entry points to csrc/cuda/topk_gate.cu's launcher, run by the warp emulator (ctypes-loaded by
// tests/test_cuda_emulated.py, which compiles this file against rewritten copies of csrc/cuda).
#include "warp_emulator.h"

#include "topk_gate.cu"

extern "C" {

size_t emu_topk_state_bytes_per_row(int dtype, int k) {
  return mxd::topk_state_bytes_per_row(static_cast<mxd::DType>(dtype), k);
}

// Returns the launcher's cudaError_t; the emulator's error message, if any, goes to `error`.
int emu_topk_gate_tile(int dtype, const void* logits, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset,
                       int k, void* state, int first, int last, void* values, int64_t* indices, char* error,
                       int error_bytes) {
  emu::g_error.clear();
  const cudaError_t status = mxd::topk_gate_tile(static_cast<mxd::DType>(dtype), logits, rows, cols, ld, col_offset,
                                                 k, state, first != 0, last != 0, values, indices, nullptr);
  std::snprintf(error, static_cast<size_t>(error_bytes), "%s", emu::g_error.c_str());
  return static_cast<int>(status);
}

}  // extern "C"
