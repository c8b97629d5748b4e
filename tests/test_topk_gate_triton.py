"""What is particular to the Triton kernels of topk_gate (fused gate GEMM + relu + exact top-k, and its
backward): selection paths, splits over N, configurations, NaN and ties across chunks, the torch fallback,
the backward kernel's flags. The op itself on every backend is tests/test_ops.py's, from mxd_fast.specs.
On CPU these run under TRITON_INTERPRET=1: shapes are small and odd."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast import reference
from mxd_fast._utils import poison_outputs
from mxd_fast.specs import SPECS
from mxd_fast.specs.topk_gate import check_selection, random_inputs

pytest.importorskip("triton")
from mxd_fast.kernels import topk_gate as tgk  # noqa: E402

pytestmark = pytest.mark.triton

SPEC = SPECS["topk_gate"]


@pytest.fixture
def dev(triton_device, monkeypatch):
    monkeypatch.setenv("MXD_FAST_AUTOTUNE", "0")  # one configuration per shape: no tuning runs
    return triton_device


def make(B, I, N, dtype, device, bias=True, seed=0):
    return random_inputs((B,), I, N, 0, bias=bias, seed=seed)(dtype, device)[:3]


def check(x, w, b, k, values, indices):
    """The spec's check of a selection (the top-k up to ties), and values in x's dtype."""
    assert values.dtype == x.dtype
    check_selection(x, w, b, k, values, indices, SPEC.tolerances[x.dtype])


# ---- forward -------------------------------------------------------------------------------

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


def test_many_equal_values_across_tiles(dev):
    """Ties at the threshold across tiles and chunks (bf16 logits with few distinct values)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randint(-2, 3, (13, 16), generator=g).to(dev, torch.bfloat16)
    w = torch.randint(-1, 2, (77, 16), generator=g).to(dev, torch.bfloat16)
    for split in (1, 2):
        values, indices = tgk._forward(x, w, None, 9, split=split)
        check(x, w, None, 9, values, indices)


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
            assert (v2.double() - values.double()).abs().max().item() <= 4 * SPEC.tolerances[dtype].atol * scale, cfg
            assert all(len(set(row.tolist())) == k for row in i2.cpu()), cfg
