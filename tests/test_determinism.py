"""With the deterministic backward (the default), gradients are bitwise identical across runs and do
not depend on how the work is split into tiles or batch chunks."""
import pytest
import torch

import mxd_fast


def _layer_grads(x, seed=0):
    torch.manual_seed(seed)
    layer = mxd_fast.MxD(10, 12, 9, 57, 6).to(x.device)
    with torch.no_grad():
        layer.decoder.normal_()
    layer(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


def _inputs(device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g).to(device)
    x[150:] = x[:150]        # repeated tokens: many rows of C and G receive several contributions
    return x


def test_bitwise_identical_across_runs(backend, device):
    x = _inputs(device)
    first, second = _layer_grads(x), _layer_grads(x)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_torch_gathered_dot_independent_of_token_chunks(monkeypatch):
    """The torch backend's gathered dot products (dvalues): the CPU masked-GEMM form and the chunked
    gather used on other devices agree, and the chunk size changes no bit."""
    from mxd_fast._torch import sparse as _sparse

    g = torch.Generator().manual_seed(2)
    table, dense = torch.randn(57, 9, generator=g), torch.randn(300, 9, generator=g)
    indices = torch.randint(0, 57, (300, 6), generator=g)
    baseline = _sparse._gathered_dot_chunked(table, indices, dense)
    monkeypatch.setattr(_sparse, "_GATHER_BUDGET", 7)
    assert torch.equal(baseline, _sparse._gathered_dot_chunked(table, indices, dense))
    torch.testing.assert_close(_sparse.gathered_dot(table, indices, dense), baseline)


@pytest.mark.parametrize("budget", [1 << 22, 40])     # one chunk; chunks of a few tokens
def test_torch_sorted_scatter_matches_the_csr_product(monkeypatch, budget):
    """The torch backend's row scatter off the CPU (sorted index_put_ or index_add_ in token chunks)
    computes what the CPU's CSR product does, in every dtype."""
    from mxd_fast._torch import sparse as _sparse

    monkeypatch.setattr(_sparse, "_GATHER_BUDGET", budget)
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 23, (300, 6), generator=g)
    indices[:, 0] = 4                                    # a hot row
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        coeffs, dense = torch.randn(300, 6, generator=g).to(dtype), torch.randn(300, 9, generator=g).to(dtype)
        want = _sparse.scatter_rows(indices, coeffs, dense, 23)
        got = _sparse._scatter_rows_chunked(indices, coeffs, dense, 23)
        assert got.dtype == dtype
        tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else {}
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(_sparse._scatter_rows_chunked(indices, coeffs, dense, 23, deterministic=False),
                                   want, **tol)
        untouched = torch.ones(23, dtype=torch.bool)
        untouched[indices.reshape(-1)] = False
        assert (got[untouched] == 0).all()
