"""Backend implementations called directly, below the public ops (which check their arguments first): the
kernels of every backend given out-of-range indices, and the torch backend's tiling of the gate."""
from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_PARAMS, running_on
from mxd_fast import reference
from mxd_fast.ops import _table
from mxd_fast.specs import SPECS, assert_close
from mxd_fast.specs.topk_gate import check_selection

F32_TOL = SPECS["gather_combine"].tolerances[torch.float32]
# Entries of bad selections, outside [0, N) in both directions; 1 << 40 would be in range if truncated to 32 bits.
BAD_INDICES = [-1, 12, 1000, 1 << 40]


def _randn(device, *shapes, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(device) for shape in shapes]


def _distinct(device, rows: int, k: int, n: int, seed: int) -> torch.Tensor:
    """[rows, k]: k distinct experts of n per row."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(rows)]).to(device)


def _bad_selection(values, indices, n_bad: int, nonfinite: bool):
    """indices with n_bad entries moved out of range; values with non-finite coefficients there (if
    nonfinite: they must not reach the output either, 0 * inf); the reference's selection without them."""
    bad = torch.zeros_like(indices, dtype=torch.bool)
    for row, col in [(0, 1), (3, 0), (8, 2), (5, 3)][:n_bad]:
        bad[row, col] = True
    device = indices.device
    indices = indices.masked_scatter(bad, torch.tensor(BAD_INDICES[:n_bad], device=device))
    kept, safe = values.masked_fill(bad, 0), indices.masked_fill(bad, 0)
    if nonfinite:
        values = values.masked_scatter(bad, torch.tensor([float("inf"), float("nan"), -float("inf"), 2.0][:n_bad],
                                                         device=device))
    return bad, values, indices, kept, safe


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gather_combine_unchecked_out_of_range_indices_contribute_zero(backend):
    """Where the op skips its range check (CUDA after the first call), every backend's kernels take an
    out-of-range index as contributing nothing, forward and backward, and never fault on it."""
    with running_on(backend, "gather_combine") as device:
        weight, values = _randn(device, (12, 7), (9, 4), seed=4)
        indices = _distinct(device, 9, 4, 12, seed=4)
        bad, values, indices, kept, safe = _bad_selection(values, indices, 4, nonfinite=True)
        forward = _table.implementation("gather_combine", "forward", device)
        backward = _table.implementation("gather_combine", "backward", device)
        assert_close(forward(weight, values, indices),
                     reference.gather_combine(weight.double(), kept.double(), safe), F32_TOL, "y")
        dy = torch.randn(9, 7, generator=torch.Generator().manual_seed(1)).to(device)
        dweight, dvalues = backward(dy, weight, values, indices, True, True, True)
    w, v = weight.double().requires_grad_(), kept.double().requires_grad_()
    reference.gather_combine(w, v, safe).backward(dy.double())
    assert_close(dweight, w.grad, F32_TOL, "dweight")
    assert_close(dvalues, v.grad.masked_fill(bad, 0), F32_TOL, "dvalues")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_mxd_decode_unchecked_out_of_range_indices_contribute_zero(backend):
    """As for gather_combine: an out-of-range index that reaches the kernels contributes nothing (in the
    Triton kernel only while its coefficient is finite: see the README)."""
    with running_on(backend, "mxd_decode") as device:
        z, decoder, experts, values, bias = _randn(device, (9, 5), (5, 7), (12, 7), (9, 4), (7,), seed=5)
        indices = _distinct(device, 9, 4, 12, seed=5)
        bad, values, indices, kept, safe = _bad_selection(values, indices, 4, nonfinite=backend != "triton")
        forward = _table.implementation("mxd_decode", "forward", device)
        backward = _table.implementation("mxd_decode", "backward", device)
        y = forward(z, decoder, experts, values, indices, bias)
        dy = torch.randn(9, 7, generator=torch.Generator().manual_seed(1)).to(device)
        got = backward(dy, z, decoder, experts, values, indices, True, True, True, True, True, True)
    leaves = [t.double().requires_grad_() for t in (z, decoder, experts, kept, bias)]
    want_y = reference.mxd_decode(*leaves[:4], safe, leaves[4])
    assert_close(y, want_y, F32_TOL, "y")
    want_y.backward(dy.double())
    want = [t.grad for t in leaves]
    want[3] = want[3].masked_fill(bad, 0)
    for name, g, w in zip(("dz", "ddecoder", "dexperts", "dvalues", "dbias"), got, want):
        assert_close(g, w, F32_TOL, name)


def test_tiles_of_the_torch_backend(monkeypatch):
    """The running top-k of the torch backend across row and expert tiles equals one dense top-k."""
    from mxd_fast._torch import topk_gate as module

    monkeypatch.setattr(module, "_TILE_EXPERTS", 7)
    monkeypatch.setattr(module, "_TILE_ELEMENTS", 20)
    spec = SPECS["topk_gate"]
    g = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((23, 6), (45, 6), (45,)))
    for k in (1, 3, 7, 8, 45):
        values, indices = module.topk_gate_torch_forward(x, w, b, k)
        check_selection(x, w, b, k, values, indices, spec.tolerances[torch.float64])
