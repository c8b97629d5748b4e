"""The building blocks of the Triton gather_combine kernels (embedding_bag, gathered_dot, scatter_rows,
scatter_sum), called directly, against float64 references with the spec's tolerances. The op itself on
every backend is tests/test_ops.py's, from mxd_fast.specs. On CPU they run under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

from mxd_fast.specs import SPECS, assert_close

pytest.importorskip("triton")
from mxd_fast.kernels import gather_combine as gck  # noqa: E402

pytestmark = pytest.mark.triton

TOL = SPECS["gather_combine"].tolerances


@pytest.fixture
def dev(triton_device):
    return triton_device


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    """actual in `dtype`, within the spec's tolerance for it of the float64 expected."""
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert_close(actual, expected, TOL[dtype])


def rand_selection(B, K, N, device, dtype, unique=True, zeros=True, gen=None):
    if unique:
        idx = torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]) if B else torch.zeros(0, K)
    else:
        idx = torch.randint(0, N, (B, K), generator=gen)
    vals = torch.randn(B, K, generator=gen)
    if zeros and B * K > 2:
        vals.view(-1)[::3] = 0.0  # relu-masked entries
    return vals.to(device, dtype), idx.to(device, torch.int64)


def ref_dense_a(values, indices, n):
    """[B, N] coefficients summing repeated indices (float64)."""
    a = torch.zeros(values.shape[0], n, dtype=torch.float64, device=values.device)
    return a.scatter_add(1, indices, values.double())


def ref_embedding_bag(table, coeffs, indices):
    return ref_dense_a(coeffs, indices, table.shape[0]) @ table.double()


def ref_scatter_rows(indices, coeffs, dense, n):
    return ref_dense_a(coeffs, indices, n).T @ dense.double()


def ref_gathered_dot(table, indices, dense):
    return torch.einsum("bkd,bd->bk", table.double()[indices], dense.double())


# (B, K, N, D): odd sizes, K = 1, K = N, B = 0, more tokens than one block
SHAPES = [(7, 3, 11, 37), (5, 1, 9, 20), (4, 6, 6, 33), (0, 3, 5, 17), (19, 5, 13, 70)]
DTYPES = [torch.float32, torch.bfloat16]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- building blocks ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N,D", SHAPES)
@pytest.mark.parametrize("unique", [True, False])
def test_embedding_bag(dev, B, K, N, D, dtype, unique):
    g = _gen(B * 1000 + K * 10 + N)
    table = torch.randn(N, D, generator=g).to(dev, dtype)
    vals, idx = rand_selection(B, K, N, dev, dtype, unique=unique, gen=g)
    out = gck.embedding_bag(table, vals, idx)
    close(out, ref_embedding_bag(table, vals, idx), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_embedding_bag_scale_and_strides(dev, dtype):
    g = _gen(1)
    B, K, N, D = 6, 4, 10, 23
    table = torch.randn(D, N, generator=g).to(dev, dtype).T            # column-major table
    vals, idx = rand_selection(B, 2 * K, N, dev, dtype, unique=False, gen=g)
    vals, idx = vals[:, ::2], idx[:, ::2]                               # strided selection
    scale = torch.randn(D, B, generator=g).to(dev, dtype).T
    out = gck.embedding_bag(table, vals, idx, scale=scale)
    close(out, ref_embedding_bag(table, vals, idx) * scale.double(), dtype)
    ones = torch.ones(1, 1, dtype=dtype, device=dev).expand(B, D)     # stride-0 scale
    close(gck.embedding_bag(table, vals, idx, scale=ones), ref_embedding_bag(table, vals, idx), dtype)
    bias = torch.randn(2 * D, generator=g).to(dev, dtype)[::2]
    buf = scale.clone()                                                 # in place: out is scale
    res = gck.embedding_bag(table, vals, idx, scale=buf, bias=bias, out=buf)
    assert res.data_ptr() == buf.data_ptr()
    close(res, ref_embedding_bag(table, vals, idx) * scale.double() + bias.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N,D", SHAPES)
def test_gathered_dot(dev, B, K, N, D, dtype):
    g = _gen(B * 1000 + K * 10 + N + 1)
    table = torch.randn(N, D, generator=g).to(dev, dtype)
    _, idx = rand_selection(B, K, N, dev, dtype, unique=False, gen=g)
    dense = torch.randn(B, D, generator=g).to(dev, dtype)
    out = gck.gathered_dot(table, idx, dense)
    close(out, ref_gathered_dot(table, idx, dense), dtype)


def test_gathered_dot_strides(dev):
    g = _gen(2)
    B, K, N, D = 5, 3, 8, 19
    table = torch.randn(D, N, generator=g).to(dev).T
    idx = torch.randint(0, N, (K, B), generator=g).to(dev).T
    dense = torch.randn(1, D, generator=g).to(dev).expand(B, D)        # stride-0 rows
    close(gck.gathered_dot(table, idx, dense), ref_gathered_dot(table, idx, dense), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N,D", SHAPES)
@pytest.mark.parametrize("unique", [True, False])
def test_scatter_rows(dev, B, K, N, D, dtype, unique):
    g = _gen(B * 1000 + K * 10 + N + 2)
    vals, idx = rand_selection(B, K, N, dev, dtype, unique=unique, gen=g)
    dense = torch.randn(B, D, generator=g).to(dev, dtype)
    expected = ref_scatter_rows(idx, vals, dense, N)
    first = gck.scatter_rows(idx, vals, dense, N, True)
    close(first, expected, dtype)
    again = gck.scatter_rows(idx, vals, dense, N, True)
    assert torch.equal(first, again), "deterministic scatter_rows is not bitwise reproducible"
    close(gck.scatter_rows(idx, vals, dense, N, False), expected, dtype)


def test_scatter_rows_heavy_row_and_strides(dev):
    """One row selected by every entry (a long CSR segment), plus unselected rows that must be zero."""
    g = _gen(3)
    B, K, N, D = 9, 3, 7, 21
    idx = torch.full((B, K), 2, dtype=torch.int64, device=dev)
    idx[::2, 0] = 5
    vals = torch.randn(K, B, generator=g).to(dev).T
    dense = torch.randn(D, B, generator=g).to(dev).T
    out = gck.scatter_rows(idx, vals, dense, N, True)
    close(out, ref_scatter_rows(idx, vals, dense, N), torch.float32)
    assert (out[[0, 1, 3, 4, 6]] == 0).all()
    grad = torch.ones(1, 1, device=dev).expand(B, D)                     # stride-0 dense
    close(gck.scatter_rows(idx, vals, grad, N, True), ref_scatter_rows(idx, vals, grad, N), torch.float32)
    csr = gck.build_csr(idx, N)
    assert torch.equal(gck.scatter_rows(idx, vals, dense, N, True, csr=csr), out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,K,N", [(7, 3, 11), (5, 1, 9), (4, 6, 6), (0, 2, 5), (40, 3, 4)])
def test_scatter_sum(dev, B, K, N, dtype):
    g = _gen(B * 100 + K * 10 + N)
    vals, idx = rand_selection(B, K, N, dev, dtype, unique=False, gen=g)
    out = gck.scatter_sum(idx, vals, N, True)
    expected = torch.zeros(N, dtype=torch.float64, device=dev).index_add_(0, idx.reshape(-1),
                                                                          vals.reshape(-1).double())
    close(out, expected, dtype)
    assert torch.equal(out, gck.scatter_sum(idx, vals, N, True))
    close(gck.scatter_sum(idx, vals, N, False, csr=gck.build_csr(idx, N)), expected, dtype)


def test_out_of_range_indices_are_masked(dev):
    """Direct kernel calls (the op layer would have rejected these): no out-of-bounds read, the
    entry contributes zero."""
    g = _gen(4)
    B, K, N, D = 4, 3, 6, 13
    table = torch.randn(N, D, generator=g).to(dev)
    vals = torch.randn(B, K, generator=g).to(dev)
    idx = torch.randint(0, N, (B, K), generator=g).to(dev)
    bad = idx.clone()
    bad[0, 1], bad[2, 0], bad[3, 2] = -1, N, N + 1000
    keep = (bad >= 0) & (bad < N)
    vz = torch.where(keep, vals, 0.0)
    dense = torch.randn(B, D, generator=g).to(dev)
    close(gck.embedding_bag(table, vals, bad), ref_embedding_bag(table, vz, idx), torch.float32)
    dots = gck.gathered_dot(table, bad, dense)
    assert (dots[~keep] == 0).all()
    close(dots[keep], ref_gathered_dot(table, idx, dense)[keep], torch.float32)
    for det in (True, False):
        close(gck.scatter_rows(bad, vals, dense, N, det), ref_scatter_rows(idx, vz, dense, N), torch.float32)
        close(gck.scatter_sum(bad, vals, N, det), ref_dense_a(vz, idx, N).sum(0), torch.float32)


# ---- non-finite rows ------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy
def test_non_finite_rows_propagate_like_torch(dev):
    """A selected row is read even with a zero coefficient: 0 * NaN = NaN, as in the torch backend."""
    table = torch.randn(5, 9, device=dev)
    table[3] = float("nan")
    idx = torch.tensor([[3, 1], [0, 2]], device=dev)
    vals = torch.tensor([[0.0, 1.0], [0.0, 0.5]], device=dev)
    out = gck.embedding_bag(table, vals, idx)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    dense = torch.randn(2, 9, device=dev)
    dense[1, 4] = float("inf")
    rows = gck.scatter_rows(idx, vals, dense, 5, True)
    assert torch.isnan(rows[0, 4]) and torch.isinf(rows[2, 4]) and torch.isfinite(rows[[1, 3]]).all()
