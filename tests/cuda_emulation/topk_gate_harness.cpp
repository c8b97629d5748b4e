// C entry points to csrc/cuda/topk_gate.cu's launcher under the warp emulator (ctypes-loaded by
// tests/test_cuda_emulated.py, which compiles the harnesses against rewritten copies of csrc/cuda).
// Each returns the launcher's cudaError_t and writes the emulator's error message, if any, to error.
#include "warp_emulator.h"

#include "topk_gate.cu"

extern "C" {

size_t emu_topk_state_bytes_per_row(int dtype, int k) {
  return mxd::topk_state_bytes_per_row(static_cast<mxd::DType>(dtype), k);
}

int emu_topk_gate_tile(int dtype, const void* logits, int64_t rows, int64_t cols, int64_t ld, int64_t col_offset,
                       int k, void* state, int first, int last, void* values, int64_t* indices, char* error,
                       int error_bytes) {
  emu::begin_call();
  return emu::end_call(mxd::topk_gate_tile(static_cast<mxd::DType>(dtype), logits, rows, cols, ld, col_offset, k,
                                           state, first != 0, last != 0, values, indices, nullptr),
                       error, error_bytes);
}

}  // extern "C"
