"""What is particular to the CUDA kernels (csrc/): the gate's exact tie order, and its backward kernel given
out-of-range indices. Their other paths (several gate tiles, k at and above the in-kernel limit, NaN in
the gate, half precision, the vectorised and the scalar gather paths, bitwise determinism with hot
experts, empty batches) are GPU-size samples of mxd_fast.specs, run by tests/test_ops.py on every backend.
Skipped without a GPU and the built extension."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast import _extension

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(torch.cuda.is_available() and not _extension.cuda_ops_loaded(),
                       reason=f"the CUDA extension is not built: {_extension.cuda_load_error()}"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_backend(monkeypatch):
    monkeypatch.setenv("MXD_FAST_POISON", "1")  # the bindings poison their outputs
    with mxd_fast.use_backend("cuda"):
        yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(DEV, dtype)


@pytest.mark.parametrize("B", [5, 3000], ids=["one_tile", "several_tiles"])
def test_topk_gate_ties_keep_the_earlier_expert(B):
    """Logits that are the bias exactly (x = 0), with many ties and negative values (relu'd to 0): the
    CUDA kernel ranks by (value, expert id), so its indices are exactly the stable descending order."""
    N, k = 5000, 600  # about 555 experts share the largest value, the rest of the k the next
    bias = torch.randint(-3, 6, (N,), generator=_gen(11)).double().to(DEV)  # ties at every value
    x, w = torch.zeros(B, 8, device=DEV), _randn(N, 8, seed=12)
    values, indices = mxd_fast.topk_gate(x, w, bias.float(), k)
    order = torch.sort(-bias.relu().cpu(), stable=True).indices[:k]
    assert torch.equal(indices.cpu(), order.expand(B, k))
    assert torch.equal(values.cpu().double(), bias.relu().cpu()[order].expand(B, k))


def test_topk_gate_backward_out_of_range_indices_are_masked():
    """The gate's backward kernel given indices outside [0, N) (which the op layer would have rejected; the
    other kernels' are tests/test_ops_backends.py's, on every backend): no fault, finite gradients."""
    ops = torch.ops.mxd_fast_cuda
    N, B, K = 10, 6, 4
    vals = _randn(B, K, seed=22)
    bad = torch.randint(0, N, (B, K), generator=_gen(23)).to(DEV)
    bad[0, 1], bad[2, 3], bad[4, 0] = -1, N, 1 << 40
    x = _randn(B, 7, seed=27)
    gate_w = _randn(N, 7, seed=28)
    dx, dgw, dgb = ops.topk_gate_backward(vals, x, gate_w, vals.abs(), bad, True, True, True, True)
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in (dx, dgw, dgb))
