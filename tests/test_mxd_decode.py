"""mxd_decode against the dense reference, on every backend."""
import pytest
import torch

import mxd_fast
from mxd_fast import reference

OP = "mxd_decode"

SHAPES = [  # (leading dims, H, O, N, K)
    ((5,), 6, 7, 13, 1),
    ((4,), 5, 3, 6, 6),        # K = N
    ((2, 3), 9, 11, 37, 4),    # leading batch dims
    ((33,), 20, 17, 70, 8),
]


def _inputs(lead, H, O, N, K, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    z, decoder, experts, values = r(*lead, H), r(H, O), r(N, O), r(*lead, K)
    indices = torch.rand(*lead, N, generator=g).argsort(dim=-1)[..., :K].to(device)
    return z, decoder, experts, values, indices, (r(O) if bias else None)


@pytest.mark.parametrize("lead,H,O,N,K", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(backend, device, lead, H, O, N, K, dtype, bias):
    args = _inputs(lead, H, O, N, K, dtype, device, bias)
    y = mxd_fast.mxd_decode(*args)
    assert y.shape == (*lead, O) and y.dtype == dtype
    torch.testing.assert_close(y, reference.mxd_decode(*args))


@pytest.mark.parametrize("lead,H,O,N,K", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_reference(backend, device, lead, H, O, N, K, bias):
    z, decoder, experts, values, indices, b = _inputs(lead, H, O, N, K, torch.float64, device, bias, seed=1)
    dy = torch.randn(*lead, O, dtype=torch.float64, device=device)
    grads = []
    for fn in (mxd_fast.mxd_decode, reference.mxd_decode):
        leaves = [t.clone().requires_grad_() for t in (z, decoder, experts, values)]
        bb = b.clone().requires_grad_() if bias else None
        (fn(*leaves, indices, bb) * dy).sum().backward()
        grads.append([t.grad for t in leaves] + ([bb.grad] if bias else []))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)



def test_more_selections_than_experts(backend, device):
    """K > N: every row repeats experts; every gradient still matches."""
    z, decoder, experts, values, _, b = _inputs((5,), 6, 4, 9, 9, torch.float64, device, seed=3)
    values = torch.randn(5, 33, dtype=torch.float64, device=device)
    indices = torch.randint(0, 9, (5, 33), device=device)
    dy = torch.randn(5, 4, dtype=torch.float64, device=device)
    grads = []
    for fn in (mxd_fast.mxd_decode, reference.mxd_decode):
        leaves = [t.clone().requires_grad_() for t in (z, decoder, experts, values, b)]
        (fn(*leaves[:4], indices, leaves[4]) * dy).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)

def test_partial_gradients_and_stride_zero(backend, device):
    z, decoder, experts, values, indices, b = _inputs((7,), 4, 6, 15, 3, torch.float64, device, seed=2)
    e = experts.clone().requires_grad_()
    mxd_fast.mxd_decode(z, decoder, e, values, indices, b).sum().backward()
    er = experts.clone().requires_grad_()
    reference.mxd_decode(z, decoder, er, values, indices, b).sum().backward()
    torch.testing.assert_close(e.grad, er.grad)


def test_empty_batch(backend, device):
    args = _inputs((0,), 4, 5, 6, 2, torch.float32, device)
    assert mxd_fast.mxd_decode(*args).shape == (0, 5)


def test_opcheck():
    args = _inputs((3, 2), 5, 4, 9, 3, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.mxd_fast.mxd_decode.default, args)
    z, decoder, experts, values, indices, b = args
    leaves = tuple(t.clone().requires_grad_() for t in (z, decoder, experts, values))
    torch.library.opcheck(torch.ops.mxd_fast.mxd_decode.default, (*leaves, indices, b.requires_grad_()))
    torch.library.opcheck(torch.ops.mxd_fast.mxd_decode.default, (*leaves, indices, None))


def test_gradcheck():
    z, decoder, experts, values, indices, b = _inputs((2, 3), 4, 5, 8, 3, torch.float64, "cpu", seed=3)
    leaves = tuple(t.requires_grad_() for t in (z, decoder, experts, values, b))
    assert torch.autograd.gradcheck(lambda z, d, e, v, b: mxd_fast.mxd_decode(z, d, e, v, indices, b), leaves)


def test_unchecked_out_of_range_indices_contribute_zero(backend, device):
    """As for gather_combine: an out-of-range index that reaches the kernels contributes nothing."""
    from mxd_fast.ops._dispatch import kernel
    from mxd_fast.ops.mxd_decode import mxd_decode_torch_backward, mxd_decode_torch_forward
    z, decoder, experts, values, indices, b = _inputs((9,), 5, 7, 12, 4, torch.float32, device, seed=4)
    bad = torch.zeros_like(indices, dtype=torch.bool)
    bad[0, 1] = bad[3, 0] = bad[8, 2] = True
    indices = indices.masked_scatter(bad, torch.tensor([-1, 12, 1000], device=device))
    kept, safe = values.masked_fill(bad, 0), indices.masked_fill(bad, 0)
    if backend != "triton":   # their coefficients must not reach the output either (0 * inf); see the README
        values = values.masked_scatter(bad, torch.tensor([float("inf"), float("nan"), -float("inf")], device=device))
    forward = kernel(OP, "forward", device, mxd_decode_torch_forward)
    backward = kernel(OP, "backward", device, mxd_decode_torch_backward)
    torch.testing.assert_close(forward(z, decoder, experts, values, indices, b),
                               reference.mxd_decode(z, decoder, experts, kept, safe, b))
    dy = torch.randn(9, 7, device=device)
    got = backward(dy, z, decoder, experts, values, indices, True, True, True, True, True, True)
    leaves = [t.clone().requires_grad_() for t in (z, decoder, experts, kept, b)]
    reference.mxd_decode(*leaves[:4], safe, leaves[4]).backward(dy)
    want = [t.grad for t in leaves]
    want[3] = want[3].masked_fill(bad, 0)
    for name, g, w in zip(("dz", "ddecoder", "dexperts", "dvalues", "dbias"), got, want):
        torch.testing.assert_close(g, w, msg=name)
