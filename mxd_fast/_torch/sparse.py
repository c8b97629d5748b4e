"""K-sparse building blocks of the torch backend. None of them forms a [B, N] tensor."""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Rows of a temporary [rows, K, D] gather kept under this many elements (4x that for the row scatter
# off the CPU, where fewer, larger launches pay).
_GATHER_BUDGET = 1 << 22


def in_range(coeffs: torch.Tensor, indices: torch.Tensor, n_rows: int):
    """(coeffs, indices, valid) with each selection outside [0, n_rows) moved to row 0 with coefficient
    0. Such indices reach the kernels where the ops skip their range check (CUDA, after the first
    call), and ATen's gathers and scatters would fault on them; this way they contribute zero
    (unless row 0 holds Inf or NaN: the Triton and CUDA kernels never read such a row at all).
    CPU: when every index is in range (as the ops check there), the inputs themselves and a scalar True."""
    if indices.device.type == "cpu" and indices.numel() > 0:
        lo, hi = torch.aminmax(indices)
        if int(lo) >= 0 and int(hi) < n_rows:
            return coeffs, indices, torch.ones((), dtype=torch.bool)
    valid = (indices >= 0) & (indices < n_rows)
    return torch.where(valid, coeffs, 0), torch.where(valid, indices, 0), valid


def gather_combine(table: torch.Tensor, coeffs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """out[b] = sum_j coeffs[b, j] * table[indices[b, j]]: an embedding-bag. [B, K] -> [B, D]."""
    if indices.shape[0] == 0 or table.shape[1] == 0:
        return table.new_zeros(indices.shape[0], table.shape[1])
    return F.embedding_bag(indices, table, per_sample_weights=coeffs.contiguous(), mode="sum")


def _sparse_dtype(dtype: torch.dtype) -> torch.dtype:
    """ATen's CPU sparse kernels cover float32 and float64: half types compute in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _csr(crow, col, val, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, val, size=size, check_invariants=False)


class RowGroups(NamedTuple):
    """The B*K selections of a [B, K] index tensor grouped by the row they select: entry e (of B*K) is
    selection order[e] of the flat [B*K] selections, made by token tokens[e]; row n's entries are
    crow[n]:crow[n+1], in token order (a stable sort), so that sums over them are reproducible."""
    order: torch.Tensor
    crow: torch.Tensor
    tokens: torch.Tensor


def row_groups(indices: torch.Tensor, n_rows: int) -> RowGroups | None:
    """The selections of `indices` ([B, K], B*K >= 1) grouped by row: the CSR structure of the
    [n_rows, B] selection matrix (one entry per selection, repeats kept). None when an index lies
    outside [0, n_rows) (the sorted indices show it, at no extra pass)."""
    K = indices.shape[1]
    keys, order = torch.sort(indices.reshape(-1), stable=True)
    if int(keys[0]) < 0 or int(keys[-1]) >= n_rows:
        return None
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(torch.bincount(keys, minlength=n_rows), 0, out=crow[1:])
    return RowGroups(order, crow, torch.div(order, K, rounding_mode="floor"))


def _groups(indices: torch.Tensor, n_rows: int, rows: RowGroups | None) -> RowGroups:
    """`rows`, or the row groups of indices that the caller has brought into [0, n_rows)."""
    rows = rows if rows is not None else row_groups(indices, n_rows)
    if rows is None:
        raise IndexError(f"indices outside [0, {n_rows}) reached the row products (in_range first)")
    return rows


def gathered_dot(table: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor,
                 rows: RowGroups | None = None) -> torch.Tensor:
    """out[b, j] = <dense[b], table[indices[b, j]]>. [B, K] -> [B, K]: the product table @ dense.T
    sampled at the selected entries (a CSR-masked GEMM). CPU: the mask is row-grouped ([n_rows, B],
    `rows` when given), so each selected table row is read once, in order, rather than once per
    selection; each entry is one dot product (deterministic)."""
    B, K = indices.shape
    if B == 0 or table.shape[1] == 0:
        return dense.new_zeros(B, K)
    if dense.device.type != "cpu":
        return _gathered_dot_chunked(table, indices, dense)
    dtype = _sparse_dtype(dense.dtype)
    if K > table.shape[0]:
        # A row repeats an index; ATen's sampled_addmm refuses more entries than its dense size.
        return _gathered_dot_chunked(table.to(dtype), indices, dense.to(dtype)).to(dense.dtype)
    rows = _groups(indices, table.shape[0], rows)
    mask = _csr(rows.crow, rows.tokens, torch.zeros(B * K, dtype=dtype), (table.shape[0], B))
    grouped = torch.sparse.sampled_addmm(mask, table.to(dtype), dense.to(dtype).T, beta=0.0).values()
    out = torch.empty(B, K, dtype=dtype)
    out.view(-1).scatter_(0, rows.order, grouped)   # scatter_, not indexing: no thread team at small sizes
    return out.to(dense.dtype)


def _gathered_dot_chunked(table: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    B, K = indices.shape
    D = table.shape[1]
    out = torch.empty(B, K, dtype=dense.dtype, device=dense.device)
    step = max(1, _GATHER_BUDGET // max(1, K * D))
    for b0 in range(0, B, step):
        rows = table[indices[b0:b0 + step]]                       # [b, K, D]
        torch.bmm(rows, dense[b0:b0 + step].unsqueeze(-1), out=out[b0:b0 + step].unsqueeze(-1))
    return out


def scatter_rows(indices: torch.Tensor, coeffs: torch.Tensor, dense: torch.Tensor, n_rows: int,
                 deterministic: bool = True, rows: RowGroups | None = None) -> torch.Tensor:
    """out[n] = sum_{(b, j): indices[b, j] = n} coeffs[b, j] * dense[b]: the K-sparse row update of
    a [n_rows, D] weight gradient. CPU: an embedding bag over dense's rows with one bag per output row
    (the row-grouped selections, `rows` when given): each row is summed in token order by one thread
    and written once (deterministic). Other devices: chunks of token contributions added with
    index_put_(accumulate=True), whose CUDA kernel sorts the indices and sums each row's contributions
    in order (deterministic), or with atomic index_add_ (deterministic=False, faster)."""
    B, K = indices.shape
    D = dense.shape[1]
    if B == 0 or D == 0:
        return dense.new_zeros(n_rows, D)
    if dense.device.type != "cpu":
        return _scatter_rows_chunked(indices, coeffs, dense, n_rows, deterministic)
    rows = _groups(indices, n_rows, rows)
    # ATen's bag kernel sums the half types in float32 (fbgemm's kernel), the others in their own
    # dtype, and writes every bag (empty ones as zeros). Mixed dtypes compute in float32 or float64.
    dtype = dense.dtype if coeffs.dtype == dense.dtype else _sparse_dtype(dense.dtype)
    out = F.embedding_bag(rows.tokens, dense.to(dtype).contiguous(), rows.crow, mode="sum",
                          per_sample_weights=coeffs.reshape(-1).index_select(0, rows.order).to(dtype),
                          include_last_offset=True)
    return out.to(dense.dtype)


def _scatter_rows_chunked(indices, coeffs, dense, n_rows, deterministic=True):
    B, K = indices.shape
    D = dense.shape[1]
    acc = _sparse_dtype(dense.dtype)
    out = torch.zeros(n_rows, D, dtype=acc, device=dense.device)
    budget = _GATHER_BUDGET * (1 if dense.device.type == "cpu" else 4)
    step = max(1, budget // max(1, K * D))
    for b0 in range(0, B, step):
        c = coeffs[b0:b0 + step].to(acc)
        rows = (c[:, :, None] * dense[b0:b0 + step, None, :].to(acc)).reshape(-1, D)
        flat = indices[b0:b0 + step].reshape(-1)
        if deterministic:
            out.index_put_((flat,), rows, accumulate=True)
        else:
            out.index_add_(0, flat, rows)
    return out.to(dense.dtype)


def scatter_sum(indices: torch.Tensor, coeffs: torch.Tensor, n_rows: int, deterministic: bool = True) -> torch.Tensor:
    """out[n] = sum_{(b, j): indices[b, j] = n} coeffs[b, j], summed in float32 (or float64) whatever
    coeffs' dtype. index_add_ on the CPU (sequential, deterministic); elsewhere the sorted index_put_
    (deterministic) or index_add_ (atomics on CUDA)."""
    acc = _sparse_dtype(coeffs.dtype)
    out = torch.zeros(n_rows, dtype=acc, device=coeffs.device)
    flat, terms = indices.reshape(-1), coeffs.reshape(-1).to(acc)
    if coeffs.device.type == "cpu" or not deterministic:
        out.index_add_(0, flat, terms)
    else:
        out.index_put_((flat,), terms, accumulate=True)
    return out.to(coeffs.dtype)
