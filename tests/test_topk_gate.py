"""topk_gate against the dense reference, on every backend."""
import pytest
import torch

import mxd_fast
from mxd_fast import reference
from conftest import tolerance

OP = "topk_gate"

SHAPES = [  # (leading dims, I, N, k)
    ((5,), 7, 13, 1),
    ((5,), 7, 13, 13),      # k = N
    ((2, 3), 9, 37, 4),     # leading batch dims
    ((33,), 17, 70, 8),
    ((1,), 3, 1, 1),        # N = 1
]


def _inputs(lead, I, N, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, I, generator=g, dtype=torch.float64).to(device, dtype)
    w = torch.randn(N, I, generator=g, dtype=torch.float64).to(device, dtype)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(device, dtype) if bias else None
    return x, w, b


def _check_selection(x, w, b, k, values, indices):
    """values are the top-k of relu(logits), sorted, and indices point at entries with those values."""
    ref_values, _ = reference.topk_gate(x.double(), w.double(), None if b is None else b.double(), k)
    tol = tolerance(x.dtype)
    torch.testing.assert_close(values.double(), ref_values, **tol)
    assert indices.dtype == torch.int64
    assert (values[..., :-1] >= values[..., 1:]).all(), "values are not sorted descending"
    logits = torch.relu(x.double() @ w.double().T + (0 if b is None else b.double()))
    torch.testing.assert_close(logits.gather(-1, indices), ref_values, **tol)
    flat = indices.reshape(-1, k)
    assert all(len(set(row.tolist())) == k for row in flat), "an expert was selected twice"


@pytest.mark.parametrize("lead,I,N,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(backend, device, lead, I, N, k, dtype, bias):
    x, w, b = _inputs(lead, I, N, dtype, device, bias)
    values, indices = mxd_fast.topk_gate(x, w, b, k)
    assert values.shape == (*lead, k) and values.dtype == dtype
    _check_selection(x, w, b, k, values, indices)


@pytest.mark.parametrize("lead,I,N,k", SHAPES)
def test_gradients_match_reference(backend, device, lead, I, N, k):
    x, w, b = _inputs(lead, I, N, torch.float64, device, seed=1)
    dy = torch.randn(*lead, k, dtype=torch.float64, device=device)
    grads = []
    for fn in (mxd_fast.topk_gate, reference.topk_gate):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        values, _ = fn(xs, ws, bs, k)
        (values * dy).sum().backward()
        grads.append((xs.grad, ws.grad, bs.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bias_gradient_sums_in_float32(backend, device, dtype):
    """Thousands of tokens on few experts: a bias gradient summed in a half type would stall
    (bf16 stops counting at 256 ones in a row)."""
    x, w, b = _inputs((4096,), 3, 4, torch.float64, device, seed=6)
    b = b.abs() + 10                 # every logit positive: each selection carries gradient
    bs = b.to(dtype).requires_grad_()
    values, indices = mxd_fast.topk_gate(x.to(dtype), w.to(dtype), bs, 1)
    values.sum().backward()
    want = torch.bincount(indices.reshape(-1).cpu(), minlength=4).double()
    torch.testing.assert_close(bs.grad.double().cpu(), want, rtol=1e-2, atol=0)

def test_gradient_through_sum_has_stride_zero(backend, device):
    x, w, b = _inputs((6,), 5, 19, torch.float64, device, seed=2)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    mxd_fast.topk_gate(xs, ws, b, 3)[0].sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference.topk_gate(xr, wr, b, 3)[0].sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(ws.grad, wr.grad)


def test_ties_and_all_negative_logits(backend, device):
    x = torch.ones(4, 3, dtype=torch.float64, device=device)
    w = torch.ones(10, 3, dtype=torch.float64, device=device)
    w[5:] = -1.0                                     # five tied positive logits, five negative
    values, indices = mxd_fast.topk_gate(x, w, None, 7)
    assert (values[:, :5] == 3).all() and (values[:, 5:] == 0).all()
    assert (indices[:, :5].sort(dim=1).values == torch.arange(5, device=device)).all()
    xs = x.clone().requires_grad_()
    mxd_fast.topk_gate(xs, w, None, 7)[0].sum().backward()
    assert torch.isfinite(xs.grad).all()
    torch.testing.assert_close(xs.grad, torch.full_like(x, 5.0))  # zeros after relu carry no gradient


def test_non_contiguous_inputs(backend, device):
    x, w, b = _inputs((8,), 12, 30, torch.float32, device, seed=3)
    xt = x.t().contiguous().t()           # column-major
    wt = torch.randn(12, 60, device=device)[:, ::2].t()    # strided rows
    for xx, ww in ((xt, w), (x, wt)):
        values, indices = mxd_fast.topk_gate(xx, ww, b, 5)
        _check_selection(xx, ww, b, 5, values, indices)


def test_empty_batch(backend, device):
    x, w, b = _inputs((0,), 4, 9, torch.float32, device)
    values, indices = mxd_fast.topk_gate(x, w, b, 3)
    assert values.shape == (0, 3) and indices.shape == (0, 3)


def test_tiles_of_the_torch_backend(monkeypatch):
    """The running top-k across row and expert tiles equals one dense top-k."""
    from mxd_fast.ops import topk_gate as module
    monkeypatch.setattr(module, "_TILE_EXPERTS", 7)
    monkeypatch.setattr(module, "_TILE_ELEMENTS", 20)
    x, w, b = _inputs((23,), 6, 45, torch.float64, "cpu", seed=4)
    for k in (1, 3, 7, 8, 45):
        values, indices = module.topk_gate_torch_forward(x, w, b, k)
        _check_selection(x, w, b, k, values, indices)


def test_opcheck():
    x, w, b = _inputs((3, 4), 6, 11, torch.float32, "cpu")
    for args in ((x, w, b, 3), (x, w, None, 11), (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2)):
        torch.library.opcheck(torch.ops.mxd_fast.topk_gate.default, args)


def test_gradcheck():
    x, w, b = _inputs((2, 3), 4, 9, torch.float64, "cpu", seed=5)
    args = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: mxd_fast.topk_gate(*a, 3)[0], args)
