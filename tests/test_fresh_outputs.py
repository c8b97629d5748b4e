"""Every op returns tensors of its own, not views: autograd refuses an in-place edit of a view that a
custom function created, so `y += 1` before backward() must work, and give the gradient of `y + 1`.
Run per backend (the `backend` fixture), with and without leading dimensions; the backward ops'
gradients are checked the same way."""
from __future__ import annotations

import pytest
import torch

import mxd_fast

LEADS = [pytest.param((), id="no-leading"), pytest.param((5,), id="2d"), pytest.param((2, 3), id="3d")]
N, K, I, H, O = 11, 3, 6, 4, 7


def _randn(*shape, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _indices(lead, device, seed):
    return torch.randint(0, N, (*lead, K), generator=torch.Generator().manual_seed(seed)).to(device)


def _assert_fresh(*outputs):
    for out in outputs:
        assert not out._is_view() and out._base is None, f"output of shape {tuple(out.shape)} is a view"


def _grads(fn, leaves, in_place: bool):
    """Gradients of sum(w * (fn(*leaves) + 1)), the + 1 done in place or not; fn's output is checked fresh."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    _assert_fresh(out)
    weight = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    if in_place:
        out += 1
    else:
        out = out + 1
    (weight * out).sum().backward()
    return [t.grad for t in leaves]


def _check_in_place_edit(fn, *leaves):
    edited = _grads(fn, leaves, in_place=True)
    plain = _grads(fn, leaves, in_place=False)
    for got, want in zip(edited, plain):
        assert got is not None
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("lead", LEADS)
def test_gather_combine(backend, device, lead):
    weight, values = _randn(N, O, device=device, seed=1), _randn(*lead, K, device=device, seed=2)
    indices = _indices(lead, device, seed=3)
    y = mxd_fast.gather_combine(weight, values, indices)
    assert y.shape == (*lead, O)
    _assert_fresh(y)
    _check_in_place_edit(lambda w, v: mxd_fast.gather_combine(w, v, indices), weight, values)


@pytest.mark.parametrize("lead", LEADS)
def test_mxd_decode(backend, device, lead):
    z, decoder = _randn(*lead, H, device=device, seed=4), _randn(H, O, device=device, seed=5)
    experts, values = _randn(N, O, device=device, seed=6), _randn(*lead, K, device=device, seed=7)
    bias, indices = _randn(O, device=device, seed=8), _indices(lead, device, seed=9)
    y = mxd_fast.mxd_decode(z, decoder, experts, values, indices, bias)
    assert y.shape == (*lead, O)
    _assert_fresh(y)
    _check_in_place_edit(lambda *a: mxd_fast.mxd_decode(*a[:4], indices, a[4]), z, decoder, experts, values, bias)


@pytest.mark.parametrize("lead", LEADS)
def test_topk_gate(backend, device, lead):
    x, weight, bias = _randn(*lead, I, device=device, seed=10), _randn(N, I, device=device, seed=11), _randn(N, device=device, seed=12)
    values, indices = mxd_fast.topk_gate(x, weight, bias, K)
    assert values.shape == indices.shape == (*lead, K)
    _assert_fresh(values, indices)
    _check_in_place_edit(lambda *a: mxd_fast.topk_gate(*a, K)[0], x, weight, bias)


def test_topk_gate_indices_edited_in_place_are_refused_by_autograd(backend, device):
    """indices are saved for the backward pass as they are: editing them in place before backward() is
    refused by autograd (as for torch.topk), never a gradient of other experts."""
    x = _randn(5, I, device=device, seed=13).requires_grad_()
    values, indices = mxd_fast.topk_gate(x, _randn(N, I, device=device, seed=14), None, K)
    indices += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        values.sum().backward()


@pytest.mark.parametrize("lead", [pytest.param((5,), id="2d"), pytest.param((2, 3), id="3d")])
def test_module_output(backend, device, lead):
    layer = mxd_fast.MxD(I, 8, 5, N, K).to(device)
    x = _randn(*lead, I, device=device, seed=15)
    y = layer(x)
    _assert_fresh(y)
    _check_in_place_edit(layer, x)
    y = layer(x)
    y += 1
    y.square().sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("lead", LEADS)
def test_backward_ops_return_fresh_gradients(backend, device, lead):
    x, gate_w = _randn(*lead, I, device=device, seed=16), _randn(N, I, device=device, seed=17)
    values, indices = mxd_fast.topk_gate(x, gate_w, None, K)
    gate = torch.ops.mxd_fast.topk_gate_backward(torch.ones_like(values), x, gate_w, values, indices,
                                                 True, True, True)
    experts = _randn(N, O, device=device, seed=18)
    combine = torch.ops.mxd_fast.gather_combine_backward(_randn(*lead, O, device=device, seed=19), experts,
                                                         values, indices, True, True)
    z, decoder = _randn(*lead, H, device=device, seed=20), _randn(H, O, device=device, seed=21)
    decode = torch.ops.mxd_fast.mxd_decode_backward(_randn(*lead, O, device=device, seed=22), z, decoder, experts,
                                                    values, indices, True, True, True, True, True)
    assert gate[0].shape == x.shape and combine[1].shape == values.shape
    assert decode[0].shape == z.shape and decode[3].shape == values.shape
    _assert_fresh(*gate, *combine, *decode)
