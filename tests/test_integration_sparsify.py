"""The sparsify adapter (mxd_fast.integrations.sparsify): sparsify's SparseCoder with mxd_fast.gather_combine
as its decoder gives the outputs, losses and gradients of sparsify's own decoder, and the swap is undone."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("sparsify")

import sparsify.sparse_coder as sparse_coder  # noqa: E402
import sparsify.utils as sparsify_utils  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402

from mxd_fast.integrations import sparsify as adapter  # noqa: E402

# (d_in, num_latents, k, transcode, skip_connection, multi_topk, dtype): odd sizes
CASES = [
    (13, 37, 5, False, False, True, torch.float64),
    (24, 61, 7, True, True, False, torch.float64),
    (9, 50, 3, True, False, True, torch.float32),
]


def decoder_in_place():
    return sparse_coder.decoder_impl, sparsify_utils.decoder_impl


@pytest.fixture
def eager_reference(monkeypatch):
    """sparsify's own decoder that runs on the CPU (its Triton decoder needs a GPU) in place, as the
    reference; monkeypatch restores whatever was there."""
    for module in (sparse_coder, sparsify_utils):
        monkeypatch.setattr(module, "decoder_impl", sparsify_utils.eager_decode)


def make_coder(d_in, num_latents, k, transcode, skip, multi_topk, dtype) -> SparseCoder:
    torch.manual_seed(0)
    cfg = SparseCoderConfig(num_latents=num_latents, k=k, transcode=transcode, skip_connection=skip,
                            multi_topk=multi_topk)
    coder = SparseCoder(d_in, cfg, dtype=dtype)
    with torch.no_grad():   # a transcoder starts with a zero decoder, a skip connection at zero
        for p in coder.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return coder


def run(coder: SparseCoder, x, y, dead_mask):
    """Every output of a forward pass, then every gradient of a loss that uses them all."""
    coder.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = coder(x, y, dead_mask=dead_mask)
    loss = out.fvu + out.auxk_loss + out.multi_topk_fvu + (out.sae_out * torch.linspace(-1, 1, x.shape[-1],
                                                                                     dtype=x.dtype)).sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in coder.named_parameters()}
    grads["x"] = x.grad.clone()
    return out, grads


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"d{c[0]}-n{c[1]}-k{c[2]}-{c[6]}")
def test_sparse_coder_unchanged_by_the_swap(eager_reference, monkeypatch, case):
    d_in, num_latents, k, transcode, skip, multi_topk, dtype = case
    coder = make_coder(*case)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(11, d_in, generator=generator, dtype=dtype)
    y = torch.randn(11, d_in, generator=generator, dtype=dtype) if transcode else None
    dead_mask = torch.rand(num_latents, generator=generator) < 0.4
    assert dead_mask.any()
    expected, expected_grads = run(coder, x, y, dead_mask)
    assert expected.auxk_loss > 0 and (expected.multi_topk_fvu > 0) == multi_topk

    calls = []
    counted = adapter.gather_combine
    monkeypatch.setattr(adapter, "gather_combine", lambda *args: calls.append(1) or counted(*args))
    with adapter.use_mxd_fast_decoder():
        assert decoder_in_place() == (adapter.decoder_impl, adapter.decoder_impl)
        got, got_grads = run(coder, x, y, dead_mask)
    assert len(calls) == 2 + multi_topk   # decode, AuxK, and the multi-TopK decode
    assert decoder_in_place() == (sparsify_utils.eager_decode, sparsify_utils.eager_decode)

    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for field in expected._fields:
        torch.testing.assert_close(getattr(got, field), getattr(expected, field), **tol, msg=field)
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, **tol, msg=name)


def test_decoder_impl_matches_eager_decode():
    generator = torch.Generator().manual_seed(2)
    W_dec = torch.randn(17, 29, generator=generator, dtype=torch.float64, requires_grad=True)   # [d_out, latents]
    top_acts = torch.rand(6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    top_indices = torch.randint(0, 29, (6, 5), generator=generator)
    top_indices[0, 1] = top_indices[0, 0]   # a latent twice in a row: summed
    ours = adapter.decoder_impl(top_indices, top_acts, W_dec)
    theirs = sparsify_utils.eager_decode(top_indices, top_acts, W_dec)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, (W_dec, top_acts), g)
    theirs_grads = torch.autograd.grad(theirs, (W_dec, top_acts), g)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_decoder_impl_refuses_bad_input():
    W_dec = torch.randn(4, 10)
    acts, idx = torch.rand(3, 2), torch.randint(0, 10, (3, 2))
    with pytest.raises(ValueError, match="W_dec"):
        adapter.decoder_impl(idx, acts, torch.randn(4, 10, 1))
    with pytest.raises(ValueError, match="top_acts and top_indices"):
        adapter.decoder_impl(idx[:, :1], acts, W_dec)
    with pytest.raises(TypeError, match="top_acts"):
        adapter.decoder_impl(idx, acts.double(), W_dec)
    with pytest.raises(TypeError, match="top_indices"):
        adapter.decoder_impl(idx.tolist(), acts, W_dec)
    with pytest.raises(IndexError, match="top_indices"):
        adapter.decoder_impl(torch.full((3, 2), 10), acts, W_dec)


def test_plain_call_swap_and_restore():
    original = decoder_in_place()
    swap = adapter.use_mxd_fast_decoder()
    try:
        assert decoder_in_place() == (adapter.decoder_impl, adapter.decoder_impl)
        with adapter.use_mxd_fast_decoder():   # nested: restores to the outer swap
            pass
        assert decoder_in_place() == (adapter.decoder_impl, adapter.decoder_impl)
    finally:
        swap.restore()
    assert decoder_in_place() == original
    swap.restore()   # a second restore does nothing
    assert decoder_in_place() == original


def test_restore_out_of_order_is_refused():
    original = decoder_in_place()
    swap = adapter.use_mxd_fast_decoder()
    try:
        sparse_coder.decoder_impl = sparsify_utils.eager_decode   # someone else's swap after ours
        with pytest.raises(RuntimeError, match="decoder_impl was replaced"):
            swap.restore()
        sparse_coder.decoder_impl = adapter.decoder_impl           # that one undone
        swap.restore()
        assert decoder_in_place() == original
    finally:
        sparse_coder.decoder_impl, sparsify_utils.decoder_impl = original


def test_swap_is_undone_when_the_block_raises():
    original = decoder_in_place()
    with pytest.raises(KeyError):
        with adapter.use_mxd_fast_decoder():
            raise KeyError("inside")
    assert decoder_in_place() == original
