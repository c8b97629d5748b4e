"""Triton kernels of gather_combine and the K-sparse building blocks shared with the other ops.

Building blocks (every [B, K] selection is `indices` int64 with `coeffs` of a floating dtype):
- embedding_bag(table, coeffs, indices)            out[b] = sum_j coeffs[b, j] * table[indices[b, j]]
- gathered_dot(table, indices, dense)              out[b, j] = <dense[b], table[indices[b, j]]>
- scatter_rows(indices, coeffs, dense, n_rows, d)  out[n] = sum_{(b, j): indices[b, j] = n} coeffs[b, j] * dense[b]
- scatter_sum(indices, coeffs, n_rows, d)          out[n] = sum_{(b, j): indices[b, j] = n} coeffs[b, j]

Every kernel takes strides (inputs may be non-contiguous or expanded with stride 0), uses 64-bit
offsets for rows of tables and tokens, accumulates in fp32 (fp64 for fp64 inputs) and masks any
index outside [0, n_rows): such an entry contributes zero and is never read. Selected entries are
always read, even with a zero coefficient, so NaN/Inf propagate as in the torch backend.

The deterministic scatter builds a CSR reverse index of the selection (histogram of the indices,
stable sort, prefix sum) and runs one program per (row, column tile) that sums the row's
contributions in a fixed order: no floating-point atomics, bitwise reproducible. Rows are visited
in order of descending count so that the heavy rows start first.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from mxd_fast._utils import new_empty

from ._device import LAUNCH_OPTIONS, compiled

__all__ = [
    "embedding_bag", "gathered_dot", "scatter_rows", "scatter_sum", "SelectionCSR", "build_csr",
    "gather_combine_forward", "gather_combine_backward",
]


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, n))))


# ---- embedding bag -----------------------------------------------------------------------

@triton.jit
def _embedding_bag_kernel(table_ptr, coeff_ptr, idx_ptr, scale_ptr, bias_ptr, out_ptr,
                          N, D, K,
                          s_tn, s_td, s_cb, s_ck, s_ib, s_ik, s_sb, s_sd, s_bias, s_ob, s_od,
                          HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                          BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, column tile); BLOCK_J rows of the table are gathered per step.
    b = tl.program_id(0).to(tl.int64)
    rd = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    md = rd < D
    rj = tl.arange(0, BLOCK_J)
    # A [BLOCK_J, BLOCK_D] accumulator reduced once after the loop: a reduction over the gathered rows
    # inside the loop would cross warps (shared memory and barriers) at every step.
    acc2 = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)
    for j0 in range(0, K, BLOCK_J):
        j = j0 + rj
        mj = j < K
        n = tl.load(idx_ptr + b * s_ib + j * s_ik, mask=mj, other=-1)
        c = tl.load(coeff_ptr + b * s_cb + j * s_ck, mask=mj, other=0).to(ACC)
        ok = mj & (n >= 0) & (n < N)
        n = tl.where(ok, n, 0).to(tl.int64)
        c = tl.where(ok, c, 0.0)    # an out-of-range entry adds nothing, whatever its coefficient (0 * inf)
        rows = tl.load(table_ptr + n[:, None] * s_tn + rd[None, :] * s_td,
                       mask=ok[:, None] & md[None, :], other=0).to(ACC)
        acc2 += rows * c[:, None]
    acc = tl.sum(acc2, axis=0)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + b * s_sb + rd * s_sd, mask=md, other=0).to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rd * s_bias, mask=md, other=0).to(ACC)
    tl.store(out_ptr + b * s_ob + rd * s_od, acc.to(out_ptr.dtype.element_ty), mask=md)


def embedding_bag(table: Tensor, coeffs: Tensor, indices: Tensor, scale: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """out[b] = sum_j coeffs[b, j] * table[indices[b, j]]  ([N, D], [B, K], [B, K] -> [B, D], table's dtype).

    Optional epilogue, applied before the single rounding to the output dtype: multiply elementwise
    by `scale` ([B, D]), then add `bias` ([D]). `out` ([B, D], table's dtype) receives the result
    and may be `scale` itself (each element is read before it is written by the same program)."""
    B, K = indices.shape
    N, D = table.shape
    if out is None:
        out = new_empty((B, D), table.dtype, table.device)
    if B == 0 or D == 0:
        return out
    if compiled(table):
        block_d, block_j, warps = _pow2(D, 32, 512), _pow2(K, 1, 8), 4
    else:
        block_d, block_j, warps = _pow2(D, 16, 32), _pow2(K, 1, 4), 1
    s = scale if scale is not None else out
    bias_t = bias if bias is not None else out
    grid = (B, triton.cdiv(D, block_d))
    _embedding_bag_kernel[grid](
        table, coeffs, indices, s, bias_t, out, N, D, K,
        table.stride(0), table.stride(1), coeffs.stride(0), coeffs.stride(1),
        indices.stride(0), indices.stride(1), s.stride(0), s.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0), out.stride(1),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ACC=_acc_dtype(table.dtype),
        BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps, **LAUNCH_OPTIONS)
    return out


# ---- gathered dot ------------------------------------------------------------------------

@triton.jit
def _gathered_dot_kernel(table_ptr, idx_ptr, dense_ptr, out_ptr,
                         N, D, K,
                         s_tn, s_td, s_ib, s_ik, s_db, s_dd, s_ob, s_ok,
                         ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, block of BLOCK_J selected rows); the width is walked in BLOCK_D tiles.
    b = tl.program_id(0).to(tl.int64)
    rj0 = tl.arange(0, BLOCK_J)
    j = tl.program_id(1) * BLOCK_J + rj0
    mj = j < K
    n = tl.load(idx_ptr + b * s_ib + j * s_ik, mask=mj, other=-1)
    ok = mj & (n >= 0) & (n < N)
    n = tl.where(ok, n, 0).to(tl.int64)
    acc2 = tl.zeros([BLOCK_J, BLOCK_D], dtype=ACC)  # reduced once, after the loop
    for d0 in range(0, D, BLOCK_D):
        rd = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        md = rd < D
        # The dense slice is loaded in the rows' own [BLOCK_J, BLOCK_D] shape (repeated reads hit L1):
        # broadcasting a [BLOCK_D] load would convert its layout through shared memory at every step.
        m2 = ok[:, None] & md[None, :]
        x = tl.load(dense_ptr + b * s_db + (rj0[:, None] * 0 + rd[None, :]) * s_dd, mask=m2, other=0).to(ACC)
        rows = tl.load(table_ptr + n[:, None] * s_tn + rd[None, :] * s_td, mask=m2, other=0).to(ACC)
        acc2 += rows * x
    acc = tl.sum(acc2, axis=1)
    tl.store(out_ptr + b * s_ob + j * s_ok, acc.to(out_ptr.dtype.element_ty), mask=mj)


def gathered_dot(table: Tensor, indices: Tensor, dense: Tensor) -> Tensor:
    """out[b, j] = <dense[b], table[indices[b, j]]>  ([N, D], [B, K], [B, D] -> [B, K], dense's dtype).
    Only the K selected rows are read: never a dense [B, N] product."""
    B, K = indices.shape
    N, D = table.shape
    out = new_empty((B, K), dense.dtype, dense.device)
    if B == 0:
        return out
    if compiled(table):
        block_j, block_d, warps = _pow2(K, 1, 16), _pow2(D, 32, 256), 4
    else:
        block_j, block_d, warps = _pow2(K, 1, 4), _pow2(D, 16, 32), 1
    grid = (B, triton.cdiv(K, block_j))
    _gathered_dot_kernel[grid](
        table, indices, dense, out, N, D, K,
        table.stride(0), table.stride(1), indices.stride(0), indices.stride(1),
        dense.stride(0), dense.stride(1), out.stride(0), out.stride(1),
        ACC=_acc_dtype(dense.dtype), BLOCK_J=block_j, BLOCK_D=block_d, num_warps=warps, **LAUNCH_OPTIONS)
    return out


# ---- reverse index -----------------------------------------------------------------------

class SelectionCSR(NamedTuple):
    """The selection [B, K] regrouped by row: entries order[offsets[n]:offsets[n + 1]] (flat
    positions b * K + j, increasing) select row n; row_order lists rows by descending count."""
    order: Tensor       # [B * K] int64 (entries with an out-of-range index come last, unreferenced)
    offsets: Tensor     # [n_rows + 1] int64
    row_order: Tensor   # [n_rows] int64


def build_csr(indices: Tensor, n_rows: int) -> SelectionCSR:
    """Stable sort of `indices`, each row's start found by binary search in the sorted keys (integer
    work only, deterministic; no host synchronisation, unlike torch.bincount on a GPU, so it runs
    inside a CUDA graph capture)."""
    flat = indices.reshape(-1)
    valid = (flat >= 0) & (flat < n_rows)
    key = torch.where(valid, flat, n_rows)
    if n_rows < 2**31 - 1 and flat.numel() < 2**31:
        # 32-bit keys: half the radix-sort passes of 64-bit ones on a GPU; the same stable order.
        key = key.to(torch.int32)
    sorted_key, order = torch.sort(key, stable=True)
    offsets = torch.searchsorted(sorted_key, torch.arange(n_rows + 1, dtype=key.dtype, device=key.device))
    counts = (offsets[1:] - offsets[:-1]).to(key.dtype)
    row_order = torch.sort(counts, descending=True, stable=True).indices
    return SelectionCSR(order, offsets, row_order)


# ---- scatter rows ------------------------------------------------------------------------

@triton.jit
def _scatter_rows_kernel(order_ptr, offsets_ptr, row_order_ptr, coeff_ptr, dense_ptr, out_ptr,
                         D, K,
                         s_cb, s_ck, s_db, s_dd, s_on, s_od,
                         ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (row, column tile): sums the row's contributions in a fixed order (BLOCK_E partial
    # sums over the entries in token order, then added together).
    r = tl.load(row_order_ptr + tl.program_id(0)).to(tl.int64)
    rd = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    md = rd < D
    start = tl.load(offsets_ptr + r)
    end = tl.load(offsets_ptr + r + 1)
    acc2 = tl.zeros([BLOCK_E, BLOCK_D], dtype=ACC)  # reduced once, after the loop
    for p0 in range(start, end, BLOCK_E):
        p = p0 + tl.arange(0, BLOCK_E)
        mp = p < end
        e = tl.load(order_ptr + p, mask=mp, other=0).to(tl.int64)
        bb = e // K
        jj = e - bb * K
        c = tl.load(coeff_ptr + bb * s_cb + jj * s_ck, mask=mp, other=0).to(ACC)
        x = tl.load(dense_ptr + bb[:, None] * s_db + rd[None, :] * s_dd,
                    mask=mp[:, None] & md[None, :], other=0).to(ACC)
        acc2 += x * c[:, None]
    acc = tl.sum(acc2, axis=0)
    tl.store(out_ptr + r * s_on + rd * s_od, acc.to(out_ptr.dtype.element_ty), mask=md)


@triton.jit
def _scatter_rows_atomic_kernel(idx_ptr, coeff_ptr, dense_ptr, out_ptr,
                                N, D, K,
                                s_ib, s_ik, s_cb, s_ck, s_db, s_dd, s_on, s_od,
                                BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, column tile), fp32 atomic adds into a zeroed output.
    b = tl.program_id(0).to(tl.int64)
    rd = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    md = rd < D
    x = tl.load(dense_ptr + b * s_db + rd * s_dd, mask=md, other=0).to(tl.float32)
    rj = tl.arange(0, BLOCK_J)
    for j0 in range(0, K, BLOCK_J):
        j = j0 + rj
        mj = j < K
        n = tl.load(idx_ptr + b * s_ib + j * s_ik, mask=mj, other=-1)
        c = tl.load(coeff_ptr + b * s_cb + j * s_ck, mask=mj, other=0).to(tl.float32)
        ok = mj & (n >= 0) & (n < N)
        n = tl.where(ok, n, 0).to(tl.int64)
        tl.atomic_add(out_ptr + n[:, None] * s_on + rd[None, :] * s_od, c[:, None] * x[None, :],
                      mask=ok[:, None] & md[None, :], sem="relaxed")


def scatter_rows(indices: Tensor, coeffs: Tensor, dense: Tensor, n_rows: int, deterministic: bool = True,
                 csr: Optional[SelectionCSR] = None) -> Tensor:
    """out[n] = sum_{(b, j): indices[b, j] = n} coeffs[b, j] * dense[b]  -> [n_rows, D], dense's dtype;
    zero rows where nothing was selected. `csr` (from build_csr) may be passed to share the reverse
    index between several scatters of the same selection.

    deterministic=True: CSR reverse index, one program per row, no atomics (bitwise reproducible).
    deterministic=False: fp32 atomic adds for fp32 on a GPU (the deterministic kernel otherwise)."""
    B, K = indices.shape
    D = dense.shape[1]
    out = new_empty((n_rows, D), dense.dtype, dense.device)
    if n_rows == 0 or D == 0:
        return out
    if B == 0:
        return out.zero_()
    if not deterministic and csr is None and compiled(dense) and dense.dtype == torch.float32:
        out.zero_()
        block_d, block_j = _pow2(D, 32, 512), _pow2(K, 1, 4)
        _scatter_rows_atomic_kernel[(B, triton.cdiv(D, block_d))](
            indices, coeffs, dense, out, n_rows, D, K,
            indices.stride(0), indices.stride(1), coeffs.stride(0), coeffs.stride(1),
            dense.stride(0), dense.stride(1), out.stride(0), out.stride(1),
            BLOCK_J=block_j, BLOCK_D=block_d, num_warps=4, **LAUNCH_OPTIONS)
        return out
    if csr is None:
        csr = build_csr(indices, n_rows)
    if compiled(dense):
        block_e, block_d, warps = 4, _pow2(D, 32, 512), 4
    else:
        block_e, block_d, warps = 2, _pow2(D, 16, 32), 1
    grid = (n_rows, triton.cdiv(D, block_d))
    _scatter_rows_kernel[grid](
        csr.order, csr.offsets, csr.row_order, coeffs, dense, out, D, K,
        coeffs.stride(0), coeffs.stride(1), dense.stride(0), dense.stride(1), out.stride(0), out.stride(1),
        ACC=_acc_dtype(dense.dtype), BLOCK_E=block_e, BLOCK_D=block_d, num_warps=warps,
        **LAUNCH_OPTIONS)
    return out


# ---- scatter sum -------------------------------------------------------------------------

@triton.jit
def _scatter_sum_kernel(order_ptr, offsets_ptr, coeff_ptr, out_ptr, n_rows, K, s_cb, s_ck, s_o,
                        ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr):
    # BLOCK_R rows per program; each row sums its contributions in a fixed order (as _scatter_rows_kernel).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mr = rows < n_rows
    start = tl.load(offsets_ptr + rows, mask=mr, other=0)
    end = tl.load(offsets_ptr + rows + 1, mask=mr, other=0)
    longest = tl.max(end - start, axis=0)
    re = tl.arange(0, BLOCK_E)
    acc2 = tl.zeros([BLOCK_R, BLOCK_E], dtype=ACC)  # reduced once, after the loop
    for i0 in range(0, longest, BLOCK_E):
        p = start[:, None] + i0 + re[None, :]
        mp = p < end[:, None]
        e = tl.load(order_ptr + p, mask=mp, other=0).to(tl.int64)
        bb = e // K
        jj = e - bb * K
        acc2 += tl.load(coeff_ptr + bb * s_cb + jj * s_ck, mask=mp, other=0).to(ACC)
    acc = tl.sum(acc2, axis=1)
    tl.store(out_ptr + rows * s_o, acc.to(out_ptr.dtype.element_ty), mask=mr)


def scatter_sum(indices: Tensor, coeffs: Tensor, n_rows: int, deterministic: bool = True,
                csr: Optional[SelectionCSR] = None) -> Tensor:
    """out[n] = sum_{(b, j): indices[b, j] = n} coeffs[b, j]  -> [n_rows], coeffs' dtype (a bias gradient).
    Always the deterministic CSR kernel: it is small next to the row scatter it accompanies."""
    B, K = indices.shape
    out = new_empty((n_rows,), coeffs.dtype, coeffs.device)
    if n_rows == 0:
        return out
    if B == 0:
        return out.zero_()
    if csr is None:
        csr = build_csr(indices, n_rows)
    block_r, block_e, warps = (128, 8, 4) if compiled(coeffs) else (16, 4, 1)
    _scatter_sum_kernel[(triton.cdiv(n_rows, block_r),)](
        csr.order, csr.offsets, coeffs, out, n_rows, K, coeffs.stride(0), coeffs.stride(1), out.stride(0),
        ACC=_acc_dtype(coeffs.dtype), BLOCK_R=block_r, BLOCK_E=block_e, num_warps=warps, **LAUNCH_OPTIONS)
    return out


# ---- gather_combine ----------------------------------------------------------------------

def gather_combine_forward(weight: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    return embedding_bag(weight, values, indices)


def gather_combine_backward(grad_y: Tensor, weight: Tensor, values: Tensor, indices: Tensor, need_weight: bool,
                            need_values: bool, deterministic: bool = True):
    dweight = scatter_rows(indices, values, grad_y, weight.shape[0], deterministic) if need_weight else None
    dvalues = gathered_dot(weight, indices, grad_y) if need_values else None
    return dweight, dvalues
