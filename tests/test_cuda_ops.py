"""CUDA backend only (csrc/): the paths the generic per-backend op tests do not reach - several
gate tiles, k at and above the in-kernel limit, NaN and ties in the gate, half precision, the
vectorised and the scalar gather paths, out-of-range indices masked in the kernels, bitwise
determinism with hot experts. Skipped without a GPU and the built extension."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast import _extension, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not _extension.cuda_ops_loaded(),
                       reason=f"the CUDA extension is not built: {_extension.cuda_load_error()}"),
]

DEV = "cuda"
HALF_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3),
            torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9)}


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    monkeypatch.setenv("MXD_FAST_POISON", "1")  # the bindings poison their outputs
    with mxd_fast.use_backend("cuda"):
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(DEV, dtype)


def _check_gate(x, w, b, k, values, indices):
    """values sorted descending, indices distinct and pointing at logits equal to values, values
    equal to the reference's (selections may differ between near-equal logits)."""
    tol = HALF_TOL[x.dtype]
    assert values.shape == (x.shape[0], k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < w.shape[0])).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "an expert selected twice"
    v = values.double()
    assert (v[:, :-1] >= v[:, 1:]).all(), "values not sorted descending"
    logits = torch.einsum("bi,bki->bk", x.double(), w.double()[indices])
    if b is not None:
        logits = logits + b.double()[indices]
    torch.testing.assert_close(v, logits.relu(), **tol)
    ref_v, _ = reference.topk_gate(x.double(), w.double(), None if b is None else b.double(), k)
    torch.testing.assert_close(v, ref_v, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,I,N,k", [(3000, 24, 3000, 8),     # several row and expert tiles
                                     (37, 33, 5000, 1),       # k = 1, one tile
                                     (5, 16, 1024, 1024),     # k = N at the in-kernel limit
                                     (9, 8, 2500, 1500),      # above the limit: chunked merge
                                     (64, 40, 300, 300)])     # k = N, not a power of two
def test_topk_gate_tiles_and_k(dtype, B, I, N, k):
    x, w, b = _randn(B, I, seed=1, dtype=dtype), _randn(N, I, seed=2, dtype=dtype), _randn(N, seed=3, dtype=dtype)
    values, indices = mxd_fast.topk_gate(x, w, b, k)
    _check_gate(x, w, b, k, values, indices)


def test_topk_gate_nan_is_largest_and_ties_are_exact():
    x = torch.zeros(6, 5, device=DEV)
    w = _randn(700, 5, seed=4)
    x[1] = _randn(5, seed=5)
    w[13] = float("nan")
    values, indices = mxd_fast.topk_gate(x, w, None, 20)
    # Row 0: every logit is 0 except the NaN expert, which ranks first.
    assert indices[0, 0] == 13 and torch.isnan(values[0, 0]) and (values[0, 1:] == 0).all()
    assert indices[0].unique().numel() == 20
    assert indices[1, 0] == 13 and torch.isnan(values[1, 0])
    ref = torch.topk(torch.relu(x[1:2] @ w.T), 20)
    torch.testing.assert_close(values[1:2, 1:], ref.values[:, 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("B", [5, 3000], ids=["one_tile", "several_tiles"])
def test_topk_gate_ties_keep_the_earlier_expert(B):
    """Logits that are the bias exactly (x = 0), with many ties and negative values (relu'd to 0): the
    CUDA kernel ranks by (value, expert id), so its indices are exactly the stable descending order."""
    N, k = 5000, 600  # about 555 experts share the largest value, the rest of the k the next
    bias = torch.randint(-3, 6, (N,), generator=_gen(11)).double().to(DEV)  # ties at every value
    x, w = torch.zeros(B, 8, device=DEV), _randn(N, 8, seed=12)
    values, indices = mxd_fast.topk_gate(x, w, bias.float(), k)
    order = torch.sort(-bias.relu().cpu(), stable=True).indices[:k]
    assert torch.equal(indices.cpu(), order.expand(B, k))
    assert torch.equal(values.cpu().double(), bias.relu().cpu()[order].expand(B, k))


def test_topk_gate_backward_relu_mask_and_determinism():
    x, w, b = _randn(513, 20, seed=6), _randn(90, 20, seed=7), _randn(90, seed=8)
    w[7] = 5 * w[7].abs()  # a hot expert selected by many rows
    x = x.abs()
    grads = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        values, _ = mxd_fast.topk_gate(xs, ws, bs, 12)
        values.backward(_randn(513, 12, seed=9))
        grads.append((xs.grad, ws.grad, bs.grad))
    for a, c in zip(*grads):
        assert torch.equal(a, c)
    xr, wr, br = (t.clone().double().requires_grad_() for t in (x, w, b))
    with mxd_fast.use_backend("torch"):
        vr, _ = mxd_fast.topk_gate(xr, wr, br, 12)
    vr.backward(_randn(513, 12, seed=9, dtype=torch.float64))
    for got, want in zip(grads[0], (xr.grad, wr.grad, br.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("O", [64, 63, 1])   # vectorised, scalar (odd width), a single column
def test_gather_combine_and_mxd_decode_half_and_vector_paths(dtype, O):
    B, H, N, K = 300, 24, 500, 16
    tol = HALF_TOL[dtype]
    z, dec, exp_ = _randn(B, H, seed=10, dtype=dtype), _randn(H, O, seed=11, dtype=dtype), _randn(N, O, seed=12, dtype=dtype)
    vals, bias = _randn(B, K, seed=13, dtype=dtype), _randn(O, seed=14, dtype=dtype)
    idx = torch.randint(0, N, (B, K), generator=_gen(15)).to(DEV)
    idx[:, 0] = 3  # a hot expert
    leaves = [t.clone().requires_grad_() for t in (z, dec, exp_, vals, bias)]
    y = mxd_fast.mxd_decode(leaves[0], leaves[1], leaves[2], leaves[3], idx, leaves[4])
    dy = _randn(B, O, seed=16, dtype=dtype)
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (z, dec, exp_, vals, bias)]
    yr = reference.mxd_decode(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], idx, ref_leaves[4])
    yr.backward(dy.double())
    scale = max(1.0, yr.abs().max().item())
    torch.testing.assert_close(y.double() / scale, yr / scale, **tol)
    for got, want in zip(leaves, ref_leaves):
        s = max(1.0, want.grad.abs().max().item())
        torch.testing.assert_close(got.grad.double() / s, want.grad / s, **tol)

    wc, vc = exp_.clone().requires_grad_(), vals.clone().requires_grad_()
    g = mxd_fast.gather_combine(wc, vc, idx)
    g.backward(dy)
    wr, vr = exp_.double().requires_grad_(), vals.double().requires_grad_()
    gr = reference.gather_combine(wr, vr, idx)
    gr.backward(dy.double())
    for got, want in ((g, gr), (wc.grad, wr.grad), (vc.grad, vr.grad)):
        s = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double() / s, want.detach() / s, **tol)


def test_unaligned_and_strided_operands():
    full = _randn(50, 67, seed=17)
    weight = full[:, 1:65]          # unit column stride, row stride 67: scalar path
    vals = _randn(40, 5, seed=18)
    idx = torch.randint(0, 50, (40, 5), generator=_gen(19)).to(DEV)
    torch.testing.assert_close(mxd_fast.gather_combine(weight, vals, idx),
                               reference.gather_combine(weight, vals, idx))
    wt = _randn(64, 50, seed=20).T  # column stride 50: copied by the binding
    torch.testing.assert_close(mxd_fast.gather_combine(wt, vals, idx), reference.gather_combine(wt, vals, idx))
    # grad_y with stride 0 in both dimensions (the gradient of y.sum())
    w = weight.clone().requires_grad_()
    mxd_fast.gather_combine(w, vals, idx).sum().backward()
    wr = weight.clone().requires_grad_()
    reference.gather_combine(wr, vals, idx).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad)


def test_out_of_range_indices_are_masked_in_the_kernels():
    ops = torch.ops.mxd_fast_cuda
    N, O, B, K = 10, 12, 6, 4
    weight, vals = _randn(N, O, seed=21), _randn(B, K, seed=22)
    idx = torch.randint(0, N, (B, K), generator=_gen(23)).to(DEV)
    bad = idx.clone()
    bad[0, 1], bad[2, 3], bad[4, 0] = -1, N, 1 << 40
    keep = (bad >= 0) & (bad < N)
    masked_vals = torch.where(keep, vals, torch.zeros_like(vals))
    y = ops.gather_combine_forward(weight, vals, bad)
    torch.testing.assert_close(y, reference.gather_combine(weight, masked_vals, torch.where(keep, bad, 0)))
    gy = _randn(B, O, seed=24)
    dw, dv = ops.gather_combine_backward(gy, weight, vals, bad, True, True, True)
    assert (dv[~keep] == 0).all()
    dw_ref = torch.zeros_like(weight).index_add_(0, idx[keep], masked_vals[keep, None] * gy[keep.nonzero()[:, 0]])
    torch.testing.assert_close(dw, dw_ref)
    z, dec = _randn(B, 3, seed=25), _randn(3, O, seed=26)
    y = ops.mxd_decode_forward(z, dec, weight, vals, bad, None)
    torch.testing.assert_close(y, (z @ dec) * reference.gather_combine(weight, masked_vals, torch.where(keep, bad, 0)))
    grads = ops.mxd_decode_backward(gy, z, dec, weight, vals, bad, True, True, True, True, True, True)
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in grads)
    x = _randn(B, 7, seed=27)
    gate_w = _randn(N, 7, seed=28)
    dx, dgw, dgb = ops.topk_gate_backward(vals, x, gate_w, vals.abs(), bad, True, True, True, True)
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in (dx, dgw, dgb))


def test_deterministic_with_hot_experts():
    B, O, N, K = 4096, 96, 64, 8
    weight, vals = _randn(N, O, seed=29), _randn(B, K, seed=30)
    idx = torch.randint(0, N, (B, K), generator=_gen(31)).to(DEV)
    idx[:, 0] = 0  # every token selects expert 0
    gy = _randn(B, O, seed=32)
    runs = [torch.ops.mxd_fast_cuda.gather_combine_backward(gy, weight, vals, idx, True, True, True) for _ in range(3)]
    for dw, dv in runs[1:]:
        assert torch.equal(dw, runs[0][0]) and torch.equal(dv, runs[0][1])


def test_empty_batch_everywhere():
    x, w = torch.zeros(0, 5, device=DEV), _randn(9, 5, seed=33)
    values, indices = mxd_fast.topk_gate(x, w, None, 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)
    ops = torch.ops.mxd_fast_cuda
    empty_v, empty_i = torch.zeros(0, 3, device=DEV), torch.zeros(0, 3, dtype=torch.int64, device=DEV)
    dx, dw, db = ops.topk_gate_backward(empty_v, x, w, empty_v, empty_i, True, True, True, True)
    assert dx.shape == (0, 5) and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(9, device=DEV))
    dz, dd, de, dv, dbias = ops.mxd_decode_backward(torch.zeros(0, 4, device=DEV), torch.zeros(0, 2, device=DEV),
                                                    _randn(2, 4, seed=34), _randn(9, 4, seed=35), empty_v, empty_i,
                                                    True, True, True, True, True, True)
    assert dz.shape == (0, 2) and (dd == 0).all() and (de == 0).all() and dv.shape == (0, 3) and (dbias == 0).all()
