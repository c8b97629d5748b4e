"""Triton kernels of topk_gate (fused gate GEMM + relu + exact top-k, and its backward) against
float64 references. On CPU they run under TRITON_INTERPRET=1: shapes are small and odd."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast import reference
from mxd_fast._utils import poison_outputs

pytest.importorskip("triton")
from mxd_fast.kernels import topk_gate as tgk  # noqa: E402

pytestmark = pytest.mark.triton

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture
def dev(triton_device, monkeypatch):
    monkeypatch.setenv("MXD_FAST_AUTOTUNE", "0")  # one configuration per shape: no tuning runs
    return triton_device


def make(B, I, N, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, I, generator=g, dtype=torch.float64)
    w = torch.randn(N, I, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def relu_logits(x, w, b):
    """float64 relu(x @ w.T + b) of the (already rounded) inputs."""
    logits = x.double() @ w.double().T
    if b is not None:
        logits = logits + b.double()
    return torch.relu(logits)


def check(x, w, b, k, values, indices, exact_sets=True):
    """values: the top-k of relu(logits), sorted descending; indices: distinct experts holding them;
    where the reference has a clear gap after its k-th value, the same set of experts."""
    B, N = x.shape[0], w.shape[0]
    dtype = x.dtype
    assert values.shape == (B, k) and values.dtype == dtype
    assert indices.shape == (B, k) and indices.dtype == torch.int64
    v, i = values.double().cpu(), indices.cpu()
    assert not torch.isnan(v).any(), "NaN (unwritten?) value"
    assert ((i >= 0) & (i < N)).all(), "index out of range"
    assert (v[:, :-1] >= v[:, 1:]).all(), "values not sorted descending"
    assert all(len(set(row.tolist())) == k for row in i), "an expert selected twice"
    logits = relu_logits(x, w, b).cpu()
    ref = torch.topk(logits, min(k + 1, N), dim=1)
    scale = logits.abs().max().item() + 1.0
    tol = TOL[dtype] * scale
    assert (v - ref.values[:, :k]).abs().max().item() <= tol, "values differ from the reference"
    assert (v - logits.gather(1, i)).abs().max().item() <= tol, "values do not match their experts' logits"
    if exact_sets and k < N:
        gap = ref.values[:, k - 1] - ref.values[:, k]
        clear = gap > 4 * tol
        for row in torch.nonzero(clear).flatten().tolist():
            assert set(i[row].tolist()) == set(ref.indices[row, :k].tolist()), f"row {row}: other experts"


# ---- forward -------------------------------------------------------------------------------

@pytest.mark.parametrize("B,I,N,k,dtype,bias", [
    (37, 23, 70, 5, torch.float32, True),      # nothing a multiple of a block
    (5, 7, 13, 1, torch.float32, False),       # k = 1, N smaller than a block
    (9, 16, 13, 13, torch.float32, True),      # k = N
    (3, 5, 1, 1, torch.float32, True),         # N = 1
    (1, 3, 40, 3, torch.float32, True),        # B = 1
    (20, 33, 90, 17, torch.bfloat16, True),    # bf16, k not a power of two
    (11, 19, 45, 6, torch.float16, False),     # fp16, no bias
])
def test_forward_matches_reference(dev, B, I, N, k, dtype, bias):
    x, w, b = make(B, I, N, dtype, dev, bias)
    values, indices = mxd_fast.topk_gate(x, w, b, k)
    check(x, w, b, k, values, indices)


@pytest.mark.parametrize("full_merge", [True, False])
@pytest.mark.parametrize("split", [1, 3])
def test_selection_paths(dev, full_merge, split):
    """Bitonic tile merge and candidate rounds, one chunk and a split over N with the merge kernel."""
    x, w, b = make(13, 18, 100, torch.float32, dev, seed=3)
    for k in (1, 7, 16):
        values, indices = tgk._forward(x, w, b, k, split=split, config=dict(FULL_MERGE=full_merge))
        check(x, w, b, k, values, indices)


def test_many_splits_with_short_chunks(dev):
    """More splits than tiles and chunks shorter than k: empty chunks contribute nothing."""
    x, w, b = make(6, 9, 40, torch.float32, dev, seed=4)
    values, indices = tgk._forward(x, w, b, 12, split=7, config=dict(BLOCK_N=16))
    check(x, w, b, 12, values, indices)


def test_large_k_rounds_with_small_tiles(dev):
    """K_PAD larger than BLOCK_N (rounds only): the running set is filled over several tiles."""
    x, w, b = make(5, 8, 60, torch.float32, dev, seed=5)
    values, indices = tgk._forward(x, w, b, 40, config=dict(BLOCK_N=16, FULL_MERGE=False))
    check(x, w, b, 40, values, indices)


def test_non_contiguous_inputs(dev):
    x, w, b = make(17, 2 * 21, 3 * 50, torch.float32, dev, seed=6)
    xs = x[:, ::2]                                   # stride (42, 2)
    ws = w.reshape(50, 3, 42)[:, 1, :21]             # row stride 126
    wt = w[:50, :21].t().contiguous().t()            # column-major: stride (1, 50)
    bs = b[::3]
    for ww in (ws, wt):
        values, indices = mxd_fast.topk_gate(xs, ww, bs, 6)
        check(xs, ww, bs, 6, values, indices)


def test_leading_dims_and_empty_batch(dev):
    x, w, b = make(12, 10, 30, torch.float32, dev, seed=7)
    values, indices = mxd_fast.topk_gate(x.reshape(3, 4, 10), w, b, 4)
    assert values.shape == (3, 4, 4) and indices.shape == (3, 4, 4)
    check(x, w, b, 4, values.reshape(12, 4), indices.reshape(12, 4))
    values, indices = mxd_fast.topk_gate(x[:0], w, b, 4)
    assert values.shape == (0, 4) and indices.shape == (0, 4) and indices.dtype == torch.int64


def test_ties_and_all_negative(dev):
    x = torch.ones(4, 3, device=dev)
    w = torch.ones(21, 3, device=dev)
    w[7:14] = -1.0                       # 14 tied positive logits (3.0), 7 negative -> 0
    for k in (5, 14, 17, 21):
        values, indices = mxd_fast.topk_gate(x, w, None, k)
        check(x, w, None, k, values, indices, exact_sets=False)
        pos = (values > 0).sum(1)
        assert (pos == min(k, 14)).all()
        assert (w[indices[:, :min(k, 14)], 0] == 1).all(), "a zero logit ranked above a positive one"
    # every logit negative: values are all zero, experts distinct
    values, indices = mxd_fast.topk_gate(x, -w.abs(), None, 9)
    assert (values == 0).all()
    check(x, -w.abs(), None, 9, values, indices, exact_sets=False)


def test_many_equal_values_across_tiles(dev):
    """Ties at the threshold across tiles and chunks (bf16 logits with few distinct values)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-2, 3, (13, 16), generator=g).to(dev, torch.bfloat16)
    w = torch.randint(-1, 2, (77, 16), generator=g).to(dev, torch.bfloat16)
    for split in (1, 2):
        values, indices = tgk._forward(x, w, None, 9, split=split)
        check(x, w, None, 9, values, indices, exact_sets=False)


def test_nan_and_inf_rank_like_torch(dev):
    """NaN is the largest value (as in torch.topk), then +inf; neither is dropped."""
    x, w, b = make(6, 5, 50, torch.float32, dev, seed=9)
    b[11] = float("nan")
    b[20] = -b[11]                                   # a NaN with the sign bit set
    b[30] = float("inf")
    b[45] = float("-inf")
    for split in (1, 2):
        values, indices = tgk._forward(x, w, b, 5, split=split)
        assert torch.isnan(values[:, :2]).all()
        assert (indices[:, :2].sort(1).values == torch.tensor([11, 20], device=dev)).all()
        assert (values[:, 2] == float("inf")).all() and (indices[:, 2] == 30).all()
        ref_v, _ = reference.topk_gate(x, w, b, 5)
        torch.testing.assert_close(values[:, 3:], ref_v[:, 3:], rtol=1e-5, atol=1e-5)
        assert not (indices == 45).any()


def test_fallbacks(dev):
    """fp64 and k beyond the register path use the torch backend's tiled implementation."""
    x, w, b = make(4, 6, 300, torch.float64, dev, seed=10)
    values, indices = mxd_fast.topk_gate(x, w, b, 5)
    check(x, w, b, 5, values, indices)
    x, w, b = make(3, 4, 300, torch.float32, dev, seed=11)
    k = tgk.MAX_K + 3
    values, indices = mxd_fast.topk_gate(x, w, b, k)
    check(x, w, b, k, values, indices)


# ---- backward ------------------------------------------------------------------------------

def _grads(fn, x, w, b, k, dy):
    xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
    values, _ = fn(xs, ws, bs, k)
    (values * dy).sum().backward()
    return xs.grad, ws.grad, bs.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_reference(dev, dtype):
    x, w, b = make(19, 13, 41, dtype, dev, seed=12)
    b[::4] = -50.0                                   # some selected logits are relu-masked zeros
    k = 9
    dy = torch.randn(19, k, generator=torch.Generator().manual_seed(13), dtype=torch.float64).to(dev, dtype)
    got = _grads(mxd_fast.topk_gate, x, w, b, k, dy)
    # Reference gradients for the experts the triton forward selected (ties may pick others).
    _, idx = mxd_fast.topk_gate(x, w, b, k)
    g = torch.where(relu_logits(x, w, b).cpu().gather(1, idx.cpu()) > 0, dy.double().cpu(), 0.0)
    dx = torch.einsum("bk,bki->bi", g, w.double().cpu()[idx.cpu()])
    dw = torch.zeros(41, 13, dtype=torch.float64).index_add_(0, idx.cpu().reshape(-1),
                                                             (g[:, :, None] * x.double().cpu()[:, None, :]).reshape(-1, 13))
    db = torch.zeros(41, dtype=torch.float64).index_add_(0, idx.cpu().reshape(-1), g.reshape(-1))
    tol = TOL[dtype] * 4
    for a, e in zip(got, (dx, dw, db)):
        assert a.dtype == dtype
        scale = e.abs().max().item() + 1.0
        assert (a.double().cpu() - e).abs().max().item() <= tol * scale
    if dtype == torch.float32:  # and the dense reference, whose selection is the same here
        want = _grads(reference.topk_gate, x, w, b, k, dy)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_gradient_of_sum_has_stride_zero(dev):
    x, w, b = make(7, 6, 23, torch.float32, dev, seed=14)
    got = []
    for fn in (mxd_fast.topk_gate, reference.topk_gate):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        fn(xs, ws, bs, 3)[0].sum().backward()
        got.append((xs.grad, ws.grad, bs.grad))
    for a, e in zip(*got):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def test_backward_kernel_directly(dev):
    """need_* flags, zero rows of unselected experts, and an empty batch."""
    x, w, b = make(8, 5, 30, torch.float32, dev, seed=15)
    values, indices = tgk.topk_gate_forward(x, w, b, 4)
    gv = torch.ones(1, 1, device=dev).expand(8, 4)   # stride 0
    dx, dw, db = tgk.topk_gate_backward(gv, x, w, values, indices, True, True, True, True)
    unselected = torch.ones(30, dtype=torch.bool)
    unselected[indices.reshape(-1).cpu()] = False
    assert (dw.cpu()[unselected] == 0).all() and (db.cpu()[unselected] == 0).all()
    dx2, dw2, db2 = tgk.topk_gate_backward(gv, x, w, values, indices, False, True, False, True)
    assert dx2 is None and db2 is None and torch.equal(dw2, dw)
    dx, dw, db = tgk.topk_gate_backward(gv[:0], x[:0], w, values[:0], indices[:0], True, True, True, True)
    assert dx.shape == (0, 5) and (dw == 0).all() and (db == 0).all()


def test_deterministic_backward_is_bitwise_reproducible(dev):
    # Few experts and many tokens: every expert collects many contributions.
    x, w, b = make(64, 12, 10, torch.float32, dev, seed=16)
    dy = torch.randn(64, 4, generator=torch.Generator().manual_seed(17)).to(dev)
    runs = []
    with mxd_fast.use_deterministic(True):
        for _ in range(2):
            runs.append(_grads(mxd_fast.topk_gate, x, w, b, 4, dy))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# ---- GPU only: autotuned configurations and realistic sizes ---------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,I,N,k", [(300, 96, 5000, 32), (1030, 512, 21490, 64), (64, 768, 21490, 256), (7, 200, 9000, 1)])
def test_autotuned_kernel_on_gpu(B, I, N, k, dtype, monkeypatch):
    monkeypatch.setenv("MXD_FAST_AUTOTUNE", "1")
    x, w, b = make(B, I, N, dtype, torch.device("cuda"), seed=18)
    with mxd_fast.use_backend("triton"), poison_outputs():
        values, indices = mxd_fast.topk_gate(x, w, b, k)
        check(x, w, b, k, values, indices)
        # every configuration the tuner may pick selects the same values (up to rounding)
        scale = values.double().abs().max().item() + 1.0
        for cfg in tgk._CUDA_CONFIGS:
            bb, bn, bi, warps, stages, full = cfg
            c = dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_I=bi, FULL_MERGE=full)
            if not tgk._fits(c, tgk._next_pow2(k), warps, stages, x.element_size(), tgk.shared_memory_limit(x)):
                continue
            v2, i2 = tgk._forward(x, w, b, k, config=dict(c, num_warps=warps, num_stages=stages))
            assert (v2.double() - values.double()).abs().max().item() <= 4 * TOL[dtype] * scale, cfg
            assert all(len(set(row.tolist())) == k for row in i2.cpu()), cfg
