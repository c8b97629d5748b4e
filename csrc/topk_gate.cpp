// Torch binding of topk_gate: the k largest entries of relu(x @ weight.T + bias) per row.
//
// Forward: the gate logits are produced one [rows, cols] tile at a time by cuBLAS (at::addmm into a
// workspace small enough to stay in L2) and each tile is merged by topk_gate_tile into a running
// top-k per row; the [B, N] logits never exist. Above mxd::kTopkMaxK the tiles are merged with
// torch's topk instead, still one tile at a time.
// Backward: dx is an embedding-bag over the selected rows of weight; dweight and dbias are row
// reductions over the reverse index of the selection (deterministic, no atomics). The relu mask is
// applied in-kernel (an entry with values <= 0 carries no gradient).
#include <algorithm>

#include <torch/library.h>

#include "binding_utils.h"

namespace mxd_binding {
namespace {

// Logits of at most this many elements exist at once (16 MiB in float32).
constexpr int64_t kTileElements = int64_t{1} << 22;
constexpr int64_t kMinTileExperts = 2048;

void check_gate_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_dim(x, "x", 2);
  check_dim(weight, "weight", 2);
  TORCH_CHECK_VALUE(x.is_cuda(), "mxd_fast cuda backend: x must be a CUDA tensor, got device ", x.device());
  check_float_like(weight, "weight", x, "x");
  dtype_of(x);
  TORCH_CHECK_VALUE(weight.size(1) == x.size(1), "mxd_fast cuda backend: weight must have shape [N, ", x.size(1),
              "], got ", weight.sizes());
}

// The logits of rows xb and experts [n0, n0 + cols) into out ([rows, cols], contiguous).
void gate_logits(at::Tensor& out, const at::Tensor& xb, const at::Tensor& weight,
                 const c10::optional<at::Tensor>& bias, int64_t n0, int64_t cols) {
  const at::Tensor wt = weight.narrow(0, n0, cols).t();
  if (bias.has_value()) at::addmm_out(out, bias->narrow(0, n0, cols), xb, wt);
  else at::mm_out(out, xb, wt);
}

// k above the in-kernel limit: merge per-tile torch topk results.
void topk_gate_chunked(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t k, at::Tensor& values, at::Tensor& indices) {
  const int64_t B = x.size(0), N = weight.size(0);
  const int64_t tile_n = std::min(N, std::max<int64_t>(4096, k));
  const int64_t tile_b = std::max<int64_t>(1, kTileElements / tile_n);
  for (int64_t b0 = 0; b0 < B; b0 += tile_b) {
    const int64_t rows = std::min(tile_b, B - b0);
    const at::Tensor xb = x.narrow(0, b0, rows);
    at::Tensor run_v, run_i;
    for (int64_t n0 = 0; n0 < N; n0 += tile_n) {
      const int64_t cols = std::min(tile_n, N - n0);
      at::Tensor logits = at::empty({rows, cols}, x.options());
      gate_logits(logits, xb, weight, bias, n0, cols);
      logits.relu_();
      auto [v, i] = logits.topk(std::min(k, cols), 1, /*largest=*/true, /*sorted=*/false);
      i.add_(n0);
      if (run_v.defined()) {
        v = at::cat({run_v, v}, 1);
        i = at::cat({run_i, i}, 1);
        auto [kept, pos] = v.topk(std::min(k, v.size(1)), 1, true, false);
        v = kept;
        i = i.gather(1, pos);
      }
      run_v = v;
      run_i = i;
    }
    auto [sorted, order] = run_v.sort(1, /*descending=*/true);
    values.narrow(0, b0, rows).copy_(sorted);
    indices.narrow(0, b0, rows).copy_(run_i.gather(1, order));
  }
}

std::tuple<at::Tensor, at::Tensor> topk_gate_forward(const at::Tensor& x, const at::Tensor& weight,
                                                     const c10::optional<at::Tensor>& bias, int64_t k) {
  check_gate_inputs(x, weight);
  const int64_t B = x.size(0), N = weight.size(0);
  if (bias.has_value()) {
    check_dim(*bias, "bias", 1);
    check_float_like(*bias, "bias", x, "x");
    TORCH_CHECK_VALUE(bias->size(0) == N, "mxd_fast cuda backend: bias must have shape [", N, "], got ", bias->sizes());
  }
  TORCH_CHECK_VALUE(k >= 1 && k <= N, "mxd_fast cuda backend: k must satisfy 1 <= k <= N = ", N, ", got ", k);
  TORCH_CHECK_VALUE(N < std::numeric_limits<int32_t>::max(), "mxd_fast cuda backend: N must be below 2^31 - 1, got ", N);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor values = new_empty({B, k}, x.options());
  at::Tensor indices = new_empty({B, k}, x.options().dtype(at::kLong));
  if (B == 0) return {values, indices};
  if (k > mxd::kTopkMaxK) {
    topk_gate_chunked(x, weight, bias, k, values, indices);
    return {values, indices};
  }

  // Tiles: as many experts per tile as the budget allows for the whole batch (all of them for a
  // small batch), at least kMinTileExperts; rows fill the rest of the budget.
  int64_t tile_n = std::max(kMinTileExperts, kTileElements / B);
  if (tile_n >= N) tile_n = N;
  else tile_n = tile_n / 256 * 256;
  // Contiguous tiles of a multiple of 256 experts start every row 16-byte aligned, which the kernel
  // reads 16 bytes at a time (scalar loads for the last tile and a single tile of N % 8 != 0 experts);
  // contiguous, so that cuBLAS can add the bias in its epilogue.
  const int64_t tile_b = std::min(B, std::max<int64_t>(1, kTileElements / tile_n));
  const bool single_tile = tile_n == N;

  const mxd::DType dt = dtype_of(x);
  const cudaStream_t stream = current_stream();
  at::Tensor workspace = at::empty({tile_b * tile_n}, x.options());
  at::Tensor state;
  if (!single_tile) {
    state = at::empty({tile_b * static_cast<int64_t>(mxd::topk_state_bytes_per_row(dt, static_cast<int>(k)))},
                      x.options().dtype(at::kByte));
  }
  for (int64_t b0 = 0; b0 < B; b0 += tile_b) {
    const int64_t rows = std::min(tile_b, B - b0);
    const at::Tensor xb = x.narrow(0, b0, rows);
    for (int64_t n0 = 0; n0 < N; n0 += tile_n) {
      const int64_t cols = std::min(tile_n, N - n0);
      at::Tensor logits = workspace.narrow(0, 0, rows * cols).view({rows, cols});
      gate_logits(logits, xb, weight, bias, n0, cols);
      check_launch(mxd::topk_gate_tile(dt, logits.data_ptr(), rows, cols, cols, n0, static_cast<int>(k),
                                       single_tile ? nullptr : state.data_ptr(), n0 == 0, n0 + cols >= N,
                                       values.narrow(0, b0, rows).data_ptr(),
                                       indices.narrow(0, b0, rows).data_ptr<int64_t>(), stream),
                   "topk_gate_tile");
    }
  }
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gate_backward(
    const at::Tensor& grad_values, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& values,
    const at::Tensor& indices, bool need_x, bool need_weight, bool need_bias,
    bool /*deterministic: always, no atomics*/) {
  check_gate_inputs(x, weight);
  check_selection(values, indices, x, "x");
  check_dim(grad_values, "grad_values", 2);
  check_float_like(grad_values, "grad_values", x, "x");
  const int64_t B = x.size(0), N = weight.size(0), I = x.size(1);
  TORCH_CHECK_VALUE(values.size(0) == B, "mxd_fast cuda backend: values must have ", B, " rows, got ", values.sizes());
  TORCH_CHECK_VALUE(grad_values.sizes() == values.sizes(), "mxd_fast cuda backend: grad_values must have shape ",
              values.sizes(), ", got ", grad_values.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const mxd::DType dt = dtype_of(x);
  const cudaStream_t stream = current_stream();
  const at::Tensor g = grad_values.contiguous(), v = values.contiguous(), idx = indices.contiguous();
  // Coefficients grad_values, masked where values <= 0 (the relu; NaN passes).
  const mxd::Selection sel = selection(g, &v, idx, N);

  at::Tensor dx = placeholder(x), dweight = placeholder(x), dbias = placeholder(x);
  if (need_x) {
    dx = new_empty({B, I}, x.options());
    const at::Tensor w = unit_columns(weight);
    check_launch(mxd::gather_combine(dt, matrix(w), I, sel, dx.data_ptr(), I, stream), "gather_combine");
  }
  if (need_weight || need_bias) {
    const ReverseIndex ri = reverse_index(idx, N);
    if (need_weight) {
      dweight = new_empty({N, I}, x.options());
      const at::Tensor xr = unit_columns(x);
      check_launch(mxd::scatter_rows(dt, ri.row_ptr.data_ptr<int32_t>(), ri.entries.data_ptr<int32_t>(), sel,
                                     matrix(xr), no_matrix(), I, dweight.data_ptr(), stream),
                   "scatter_rows");
    }
    if (need_bias) {
      dbias = new_empty({N}, x.options());
      check_launch(mxd::scatter_sum(dt, ri.row_ptr.data_ptr<int32_t>(), ri.entries.data_ptr<int32_t>(), sel,
                                    dbias.data_ptr(), stream),
                   "scatter_sum");
    }
  }
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace mxd_binding

TORCH_LIBRARY_IMPL(mxd_fast_cuda, CUDA, m) {
  m.impl("topk_gate_forward", &mxd_binding::topk_gate_forward);
  m.impl("topk_gate_backward", &mxd_binding::topk_gate_backward);
}
