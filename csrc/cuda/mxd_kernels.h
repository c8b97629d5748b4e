// Launchers of the mxd_fast CUDA kernels. Free of torch: raw pointers, sizes, a cudaStream_t.
// Conventions shared by every launcher:
//  - a matrix is (pointer, row stride in elements) with unit column stride; a row stride may be 0
//    (a broadcast row); all offsets are 64-bit;
//  - a Selection is the [B, K] values (contiguous), the [B, K] int64 indices (contiguous) and an
//    optional [B, K] mask (contiguous): where mask is given, an entry whose mask is not > 0 has
//    coefficient 0 (the relu mask of the gate); an index outside [0, N) contributes 0 and is never
//    dereferenced;
//  - floating data is float32, float16, bfloat16 or float64 (DType); arithmetic is float32
//    (float64 for float64 data);
//  - a launcher returns the launch status (cudaGetLastError) and never synchronises.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace mxd {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct Selection {
  const void* values;      // [B, K], DType
  const void* mask;        // [B, K], DType, or nullptr
  const int64_t* indices;  // [B, K]
  int64_t B;
  int64_t K;
  int64_t N;               // valid indices are [0, N)
};

struct Matrix {
  const void* data;
  int64_t row_stride;
};

// ---- sparse building blocks (gather_combine.cu) ---------------------------------------------

// out[b, :D] = sum_j coeff[b, j] * table[indices[b, j], :D]   (one warp per token, an embedding-bag)
cudaError_t gather_combine(DType dtype, Matrix table, int64_t D, const Selection& sel, void* out,
                           int64_t out_row_stride, cudaStream_t stream);

// out[b, j] = <dense[b, :D] (* scale[b, :D]), table[indices[b, j], :D]>, out contiguous [B, K];
// scale.data may be nullptr.
cudaError_t gathered_dot(DType dtype, Matrix table, int64_t D, const Selection& sel, Matrix dense,
                         Matrix scale, void* out, cudaStream_t stream);

// Reverse index of a [B, K] index tensor: entries[row_ptr[n] .. row_ptr[n + 1]) are the flat
// positions p = b * K + j with indices[p] == n, in increasing p (a stable sort, so every row
// reduction below sums its terms in one fixed order). row_ptr has N + 1 entries, entries B * K;
// positions of out-of-range indices come after row_ptr[N]. Needs B * K < 2^31 - 1 and N < 2^31 - 2.
size_t reverse_index_workspace_bytes(int64_t total, int64_t N);
cudaError_t build_reverse_index(const int64_t* indices, int64_t total, int64_t N, int32_t* row_ptr,
                                int32_t* entries, void* workspace, size_t workspace_bytes,
                                cudaStream_t stream);

// out[n, :D] = sum over p in row n of coeff[p] * dense[p / K, :D] (* scale[p / K, :D]), for every
// n < N (rows with no entry are written as zeros); out contiguous [N, D]. scale.data may be nullptr.
cudaError_t scatter_rows(DType dtype, const int32_t* row_ptr, const int32_t* entries, const Selection& sel,
                         Matrix dense, Matrix scale, int64_t D, void* out, cudaStream_t stream);

// out[n] = sum over p in row n of coeff[p], for every n < N; out contiguous [N].
cudaError_t scatter_sum(DType dtype, const int32_t* row_ptr, const int32_t* entries, const Selection& sel,
                        void* out, cudaStream_t stream);

// ---- MxD decode (mxd_decode.cu) ----------------------------------------------------------

// y[b, :O] = h[b, :O] * gather_combine(experts, sel)[b, :O] + bias[:O], in place: y holds h
// (z @ decoder) on entry. bias may be nullptr.
cudaError_t mxd_decode_combine(DType dtype, Matrix experts, int64_t O, const Selection& sel, void* y,
                               int64_t y_row_stride, const void* bias, cudaStream_t stream);

// grad_h[b, :O] = grad_y[b, :O] * gather_combine(experts, sel)[b, :O].
cudaError_t mxd_decode_grad_h(DType dtype, Matrix experts, int64_t O, const Selection& sel, Matrix grad_y,
                              void* grad_h, int64_t grad_h_row_stride, cudaStream_t stream);

// ---- top-k gate (topk_gate.cu) -------------------------------------------------------------

// Largest k handled in-kernel; the binding merges chunks with torch's topk above it.
constexpr int kTopkMaxK = 1024;

// Bytes of running state one row needs between tiles (keys and int32 expert ids).
size_t topk_state_bytes_per_row(DType dtype, int k);

// One tile of logits [rows, cols] (row stride ld; read 16 bytes at a time where logits and ld are
// 16-byte aligned) of the experts col_offset .. col_offset + cols:
// relu, then merge into the running top-k of each row (state: rows * topk_state_bytes_per_row).
// first: the state is empty (not read). last: write the final top-k, sorted descending (NaN
// largest), to values [rows, k] (DType, contiguous) and indices [rows, k] (int64, contiguous)
// instead of the state.
cudaError_t topk_gate_tile(DType dtype, const void* logits, int64_t rows, int64_t cols, int64_t ld,
                           int64_t col_offset, int k, void* state, bool first, bool last, void* values,
                           int64_t* indices, cudaStream_t stream);

}  // namespace mxd
