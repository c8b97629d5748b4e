"""GPU only: the ops at the paper's sizes in bf16, and at sizes whose element offsets exceed 2^31
(B*N, N*I, N*O and B*O), on every backend present, against the dense reference in fp32 (on the
GPU; on slices of the rows where a whole reference would not fit). Skipped without a CUDA device."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast import reference

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"), pytest.mark.slow]

INT32 = 2 ** 31
DEV = "cuda"


def _randn(*shape, seed, scale=1.0, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(*shape, generator=g, device=DEV) * scale).to(dtype)


def _close(got, want, tol, what):
    """|got - want| <= tol * max|want| elementwise (fp32 comparison of bf16 results)."""
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got - want).abs().max() / scale).item()
    assert err <= tol, f"{what}: max error {err:.3g} of the largest magnitude > {tol}"


def _check_gate(x, w, b, k, values, indices, tol=1e-2):
    """values sorted, indices distinct and pointing at (fp32) logits equal to values, values equal to
    the fp32 reference's top-k (selections may differ between logits that round to the same bf16)."""
    assert values.shape == (x.shape[0], k) and indices.dtype == torch.int64
    assert ((indices >= 0) & (indices < w.shape[0])).all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all(), "an expert selected twice"
    assert (values[:, :-1] >= values[:, 1:]).all(), "values not sorted descending"
    logits = torch.einsum("bi,bki->bk", x.float(), w[indices].float())
    if b is not None:
        logits += b.float()[indices]
    _close(values, logits.relu(), tol, "values vs the logits of the selected experts")
    ref_v, _ = reference.topk_gate(x.float(), w.float(), None if b is None else b.float(), k)
    _close(values, ref_v, tol, "values vs the reference top-k")


def _gate_grads(grad, x, w, values, indices):
    """The gate's gradients by their definition, given the selection (fp32)."""
    g = torch.where(values.float() > 0, grad.float(), 0.0)
    dx = torch.einsum("bk,bki->bi", g, w[indices].float())
    dw = torch.zeros(w.shape, device=DEV).index_add_(0, indices.reshape(-1),
                                                    (g[:, :, None] * x.float()[:, None, :]).reshape(-1, w.shape[1]))
    db = torch.zeros(w.shape[0], device=DEV).index_add_(0, indices.reshape(-1), g.reshape(-1))
    return dx, dw, db


PAPER = {"pythia-1.4b": (2048, 8192, 57330), "llama-3.2-3b": (3072, 8192, 90087)}


@pytest.mark.parametrize("model", sorted(PAPER))
@pytest.mark.parametrize("K", [32, 128])
def test_paper_shape_bf16_gate_forward_and_backward(backend, model, K):
    d, _, N = PAPER[model]
    B = 1000   # not a multiple of any block
    x, w, b = _randn(B, d, seed=1), _randn(N, d, seed=2, scale=d ** -0.5), _randn(N, seed=3, scale=0.1)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    values, indices = mxd_fast.topk_gate(xs, ws, bs, K)
    _check_gate(x, w, b, K, values.detach(), indices)
    grad = _randn(B, K, seed=4)
    values.backward(grad)
    for got, want, name in zip((xs.grad, ws.grad, bs.grad), _gate_grads(grad, x, w, values.detach(), indices),
                               ("dx", "dweight", "dbias")):
        _close(got, want, 2e-2, name)
    untouched = torch.ones(N, dtype=torch.bool, device=DEV)
    untouched[indices.reshape(-1)] = False
    assert (ws.grad[untouched] == 0).all() and (bs.grad[untouched] == 0).all(), "gradient outside the selection"


@pytest.mark.parametrize("model", sorted(PAPER))
@pytest.mark.parametrize("K", [32, 128])
def test_paper_shape_bf16_decode_forward_and_backward(backend, model, K):
    d, H, N = PAPER[model]
    B = 1000
    z, dec = _randn(B, H, seed=5), _randn(H, d, seed=6, scale=H ** -0.5)
    experts, bias = _randn(N, d, seed=7, scale=d ** -0.5), _randn(d, seed=8, scale=0.1)
    values = _randn(B, K, seed=9).abs()
    g = torch.Generator(device=DEV).manual_seed(10)
    indices = torch.rand(B, N, device=DEV, generator=g).topk(K, dim=1).indices   # K distinct per row
    leaves = [t.clone().requires_grad_() for t in (z, dec, experts, values, bias)]
    y = mxd_fast.mxd_decode(leaves[0], leaves[1], leaves[2], leaves[3], indices, leaves[4])
    ref_leaves = [t.float().requires_grad_() for t in (z, dec, experts, values, bias)]
    y_ref = reference.mxd_decode(ref_leaves[0], ref_leaves[1], ref_leaves[2], ref_leaves[3], indices, ref_leaves[4])
    _close(y, y_ref, 2e-2, "y")
    dy = _randn(B, d, seed=11)
    y.backward(dy)
    y_ref.backward(dy.float())
    for got, want, name in zip(leaves, ref_leaves, ("dz", "ddecoder", "dexperts", "dvalues", "dbias")):
        _close(got.grad, want.grad, 2e-2, name)
    c = mxd_fast.gather_combine(experts, values, indices)
    _close(c, reference.gather_combine(experts.float(), values.float(), indices), 2e-2, "gather_combine")


# ---- offsets beyond 2^31 ---------------------------------------------------------------------

def test_gate_weight_beyond_2_31_elements(backend):
    """N * I > 2^31: experts whose rows start past element 2^31 of weight are found and differentiated."""
    I = 8192
    N = INT32 // I + 5000
    B, K = 77, 8
    w = _randn(N, I, seed=12, scale=I ** -0.5)
    x = _randn(B, I, seed=13)
    far = torch.arange(N - 3 * B, N, 3, device=DEV)        # one planted expert per row, all past 2^31
    w[far] = (x.float() * 4 / x.float().norm(dim=1, keepdim=True)).to(w.dtype)   # logit ~ 4 |x| >> the rest
    values, indices = mxd_fast.topk_gate(x, w, None, K)
    assert (indices[:, 0] == far).all(), "the planted expert past 2^31 elements is not ranked first"
    logits = x.float() @ w.float().T
    ref_v = logits.relu().topk(K, dim=1).values
    _close(values, ref_v, 1e-2, "values")
    grad = _randn(B, K, seed=14)
    dx, dw, _ = torch.ops.mxd_fast.topk_gate_backward(grad, x, w, values, indices, True, True, False)
    want_dx, _, _ = _gate_grads(grad, x, w, values, indices)
    _close(dx, want_dx, 2e-2, "dx")
    # rows of weight past 2^31 elements: the sum of g * x over the tokens that selected them
    g = torch.where(values.float() > 0, grad.float(), 0.0)
    chose = (indices[:, :, None] == far[None, None, :]).float()          # [B, K, planted]
    _close(dw[far], torch.einsum("bkm,bk,bi->mi", chose, g, x.float()), 2e-2, "dweight past 2^31")


def test_gate_batch_times_experts_beyond_2_31(backend):
    """B * N > 2^31 (the [B, N] logits would overflow 32-bit offsets; they are never formed)."""
    I, N, K = 64, 57330, 16
    B = INT32 // N + 1000
    x, w, b = _randn(B, I, seed=15), _randn(N, I, seed=16, scale=I ** -0.5), _randn(N, seed=17, scale=0.1)
    values, indices = mxd_fast.topk_gate(x, w, b, K)
    rows = torch.cat([torch.arange(0, 300, device=DEV), torch.arange(B - 700, B, device=DEV)])
    _check_gate(x[rows], w, b, K, values[rows], indices[rows])


def test_decode_experts_and_output_beyond_2_31(backend):
    """N * O > 2^31 (expert rows past element 2^31 are gathered and their gradients written) and B * O >
    2^31 (output rows past element 2^31)."""
    O, H, K = 4096, 16, 2
    N = INT32 // O + 3000
    B = INT32 // O + 2000
    experts = _randn(N, O, seed=18, scale=O ** -0.5)
    z, dec = _randn(B, H, seed=19), _randn(H, O, seed=20, scale=H ** -0.5)
    values = _randn(B, K, seed=21).abs()
    g = torch.Generator(device=DEV).manual_seed(22)
    indices = torch.randint(0, N, (B, K), device=DEV, generator=g)
    indices[:, 0] = N - 1 - torch.arange(B, device=DEV) % 2500          # rows past 2^31 elements
    indices[:, 1] = torch.where(indices[:, 1] == indices[:, 0], (indices[:, 1] + 1) % N, indices[:, 1])
    rows = torch.cat([torch.arange(0, 500, device=DEV), torch.arange(B - 1500, B, device=DEV)])

    def ref_rows(r):
        c = torch.einsum("bk,bko->bo", values[r].float(), experts[indices[r]].float())
        return c, (z[r].float() @ dec.float())

    y = mxd_fast.gather_combine(experts, values, indices)
    c, _ = ref_rows(rows)
    _close(y[rows], c, 1e-2, "gather_combine rows past 2^31 output elements")
    del y
    y = mxd_fast.mxd_decode(z, dec, experts, values, indices, None)
    c, h = ref_rows(rows)
    _close(y[rows], c * h, 1e-2, "mxd_decode rows past 2^31 output elements")
    del y
    # backward of the experts: only touched rows are non-zero; a far row's gradient is its sum of v * dy
    dy = _randn(B, O, seed=23)
    dexperts, dvalues = torch.ops.mxd_fast.gather_combine_backward(dy, experts, values, indices, True, True)
    far = N - 1                                          # selected in column 0 by rows b = 0, 2500, 5000, ...
    users = (indices == far).nonzero()
    want = (values[users[:, 0], users[:, 1]].float()[:, None] * dy[users[:, 0]].float()).sum(0)
    _close(dexperts[far], want, 2e-2, "dexperts of a row past 2^31")
    want_dv = torch.einsum("bo,bko->bk", dy[rows].float(), experts[indices[rows]].float())
    _close(dvalues[rows], want_dv, 2e-2, "dvalues")
    untouched = torch.ones(N, dtype=torch.bool, device=DEV)
    untouched[indices.reshape(-1)] = False
    assert (dexperts[untouched] == 0).all()
