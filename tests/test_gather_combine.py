"""gather_combine against the dense reference, on every backend."""
import pytest
import torch

import mxd_fast
from mxd_fast import reference

OP = "gather_combine"

SHAPES = [  # (leading dims, N, O, K)
    ((5,), 13, 7, 1),
    ((4,), 6, 9, 6),        # K = N
    ((2, 3), 37, 11, 4),    # leading batch dims
    ((31,), 70, 33, 8),
    ((3,), 4, 5, 9),        # K > N: rows repeat experts
]


def _inputs(lead, N, O, K, dtype, device, seed=0, repeat=False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, O, generator=g, dtype=torch.float64).to(device, dtype)
    values = torch.randn(*lead, K, generator=g, dtype=torch.float64).to(device, dtype)
    if repeat or K > N:   # the same expert several times in a row
        indices = torch.randint(0, N, (*lead, K), generator=g)
    else:
        indices = torch.rand(*lead, N, generator=g).argsort(dim=-1)[..., :K]
    return weight, values, indices.to(device)


@pytest.mark.parametrize("lead,N,O,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("repeat", [False, True])
def test_forward_matches_reference(backend, device, lead, N, O, K, dtype, repeat):
    weight, values, indices = _inputs(lead, N, O, K, dtype, device, repeat=repeat)
    y = mxd_fast.gather_combine(weight, values, indices)
    assert y.shape == (*lead, O) and y.dtype == dtype
    torch.testing.assert_close(y, reference.gather_combine(weight, values, indices))


@pytest.mark.parametrize("lead,N,O,K", SHAPES)
@pytest.mark.parametrize("repeat", [False, True])
def test_gradients_match_reference(backend, device, lead, N, O, K, repeat):
    weight, values, indices = _inputs(lead, N, O, K, torch.float64, device, seed=1, repeat=repeat)
    dy = torch.randn(*lead, O, dtype=torch.float64, device=device)
    grads = []
    for fn in (mxd_fast.gather_combine, reference.gather_combine):
        w, v = weight.clone().requires_grad_(), values.clone().requires_grad_()
        (fn(w, v, indices) * dy).sum().backward()
        grads.append((w.grad, v.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)



def test_stride_zero_gradient_and_int32_indices(backend, device):
    weight, values, indices = _inputs((9,), 20, 5, 3, torch.float64, device, seed=2)
    w, v = weight.clone().requires_grad_(), values.clone().requires_grad_()
    mxd_fast.gather_combine(w, v, indices.int()).sum().backward()     # grad_y is an expanded tensor
    wr, vr = weight.clone().requires_grad_(), values.clone().requires_grad_()
    reference.gather_combine(wr, vr, indices).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad)
    torch.testing.assert_close(v.grad, vr.grad)


def test_deterministic_backward_is_bitwise_reproducible(backend, device):
    weight, values, indices = _inputs((64,), 10, 17, 5, torch.float32, device, seed=3, repeat=True)
    dy = torch.randn(64, 17, device=device)
    runs = []
    for _ in range(2):
        w, v = weight.clone().requires_grad_(), values.clone().requires_grad_()
        mxd_fast.gather_combine(w, v, indices).backward(dy)
        runs.append((w.grad, v.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_empty_batch(backend, device):
    weight, values, indices = _inputs((0,), 8, 4, 2, torch.float32, device)
    w = weight.clone().requires_grad_()
    y = mxd_fast.gather_combine(w, values, indices)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))


def test_opcheck():
    weight, values, indices = _inputs((3, 2), 9, 5, 4, torch.float32, "cpu", repeat=True)
    for args in ((weight, values, indices), (weight.requires_grad_(), values.requires_grad_(), indices)):
        torch.library.opcheck(torch.ops.mxd_fast.gather_combine.default, args)


def test_gradcheck():
    weight, values, indices = _inputs((2, 3), 7, 4, 3, torch.float64, "cpu", seed=4, repeat=True)
    assert torch.autograd.gradcheck(lambda w, v: mxd_fast.gather_combine(w, v, indices),
                                    (weight.requires_grad_(), values.requires_grad_()))


def test_unchecked_out_of_range_indices_contribute_zero(backend, device):
    """Where the op skips its range check (CUDA after the first call), every backend's kernels take an
    out-of-range index as contributing nothing, forward and backward, and never fault on it."""
    from mxd_fast.ops._dispatch import kernel
    from mxd_fast.ops.gather_combine import gather_combine_torch_backward, gather_combine_torch_forward
    weight, values, indices = _inputs((9,), 12, 7, 4, torch.float32, device, seed=4)
    bad = torch.zeros_like(indices, dtype=torch.bool)
    bad[0, 1] = bad[3, 0] = bad[5, 3] = bad[8, 2] = True
    indices = indices.masked_scatter(bad, torch.tensor([-1, 12, 1000, -5000], device=device))
    kept = values.masked_fill(bad, 0)    # the reference: the same selection without those entries
    inf, nan = float("inf"), float("nan")   # their coefficients must not reach the output either (0 * inf)
    values = values.masked_scatter(bad, torch.tensor([inf, nan, -inf, 2.0], device=device))
    safe = indices.masked_fill(bad, 0)
    forward = kernel(OP, "forward", device, gather_combine_torch_forward)
    backward = kernel(OP, "backward", device, gather_combine_torch_backward)
    torch.testing.assert_close(forward(weight, values, indices), reference.gather_combine(weight, kept, safe))
    dy = torch.randn(9, 7, device=device)
    dweight, dvalues = backward(dy, weight, values, indices, True, True, True)
    w, v = weight.clone().requires_grad_(), kept.clone().requires_grad_()
    reference.gather_combine(w, v, safe).backward(dy)
    torch.testing.assert_close(dweight, w.grad)
    torch.testing.assert_close(dvalues, v.grad.masked_fill(bad, 0))
