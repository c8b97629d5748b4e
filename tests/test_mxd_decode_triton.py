"""Triton kernels of mxd_decode (fused GEMM + gathered-expert epilogue, and its backward), against
the float64 dense reference. On CPU they run under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast import reference

pytest.importorskip("triton")
from mxd_fast.kernels import mxd_decode as mdk  # noqa: E402

pytestmark = pytest.mark.triton

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
NAMES = ("z", "decoder", "experts", "values", "bias")


@pytest.fixture
def dev(triton_device):
    return triton_device


def close(actual, expected, dtype, name=""):
    """Elementwise error within TOL[dtype] * (|expected| + max|expected|)."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert actual.dtype == dtype, (name, actual.dtype, dtype)
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite (unwritten?) output"
    bound = TOL[dtype] * (e.abs() + (e.abs().max() if e.numel() else 0) + 1e-3)
    err = (a - e).abs()
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g}"


def make_inputs(lead, H, O, N, K, dtype, device, seed, has_bias=True, unique=True):
    g = torch.Generator().manual_seed(seed)
    B = 1
    for s in lead:
        B *= s
    z = torch.randn(*lead, H, generator=g)
    decoder = torch.randn(H, O, generator=g) / H ** 0.5
    experts = torch.randn(N, O, generator=g)
    if unique:
        idx = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(B)]) if B else torch.zeros(0, K)
    else:
        idx = torch.randint(0, N, (B, K), generator=g)
    values = torch.rand(B, K, generator=g)
    if B * K > 2:
        values.view(-1)[::4] = 0.0
    bias = torch.randn(O, generator=g) if has_bias else None
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    return (cast(z), cast(decoder), cast(experts), cast(values.reshape(*lead, K)),
            idx.reshape(*lead, K).to(device, torch.int64), cast(bias) if has_bias else None)


def ref_dense(z, decoder, experts, values, indices, bias):
    """Float64 reference summing repeated experts."""
    a = torch.zeros(*values.shape[:-1], experts.shape[0], dtype=torch.float64, device=values.device)
    a = a.scatter_add(-1, indices, values.double())
    y = (a @ experts.double()) * (z.double() @ decoder.double())
    return y if bias is None else y + bias.double()


def run_case(inputs, dtype, grad_kind="dense", requires=NAMES, ref=reference.mxd_decode, seed=0):
    z, decoder, experts, values, indices, bias = inputs
    leaves = {"z": z, "decoder": decoder, "experts": experts, "values": values, "bias": bias}
    ours = {k: (v.detach().clone().requires_grad_(k in requires) if v is not None else None)
            for k, v in leaves.items()}
    refs = {k: (v.detach().double().requires_grad_(k in requires) if v is not None else None)
            for k, v in leaves.items()}
    y = mxd_fast.mxd_decode(ours["z"], ours["decoder"], ours["experts"], ours["values"], indices, ours["bias"])
    y64 = ref(refs["z"], refs["decoder"], refs["experts"], refs["values"], indices, refs["bias"])
    close(y, y64, dtype, "y")
    wanted = [k for k in NAMES if k in requires and ours[k] is not None]
    if not wanted:
        return
    if grad_kind == "expanded":
        gy = torch.ones(1, dtype=dtype, device=y.device).expand(y.shape)   # what y.sum() sends back
    else:
        g = torch.Generator().manual_seed(seed + 1)
        gy = torch.randn(*y.shape[:-1], 2 * y.shape[-1], generator=g).to(y.device, dtype)
        gy = gy[..., ::2] if grad_kind == "strided" else gy[..., : y.shape[-1]].contiguous()
    grads = torch.autograd.grad(y, [ours[k] for k in wanted], gy)
    grads64 = torch.autograd.grad(y64, [refs[k] for k in wanted], gy.double())
    for name, a, e in zip(wanted, grads, grads64):
        close(a, e, dtype, "d" + name)


# (lead, H, O, N, K): odd sizes; several row, column and H tiles; K = 1; K = N; B = 0; leading zeros
SHAPES = [((13,), 20, 37, 11, 3), ((37,), 40, 19, 7, 1), ((2, 5), 17, 33, 6, 6), ((0,), 9, 11, 5, 2),
          ((3, 0), 8, 5, 4, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,H,O,N,K", SHAPES)
@pytest.mark.parametrize("has_bias", [True, False])
def test_mxd_decode_op(dev, lead, H, O, N, K, dtype, has_bias):
    inputs = make_inputs(lead, H, O, N, K, dtype, dev, seed=H * 100 + O, has_bias=has_bias)
    run_case(inputs, dtype, seed=H)


@pytest.mark.parametrize("grad_kind", ["strided", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxd_decode_op_grad_strides(dev, grad_kind, dtype):
    inputs = make_inputs((3, 7), 21, 35, 9, 4, dtype, dev, seed=7)
    run_case(inputs, dtype, grad_kind=grad_kind)


@pytest.mark.parametrize("requires", [("z",), ("decoder",), ("experts",), ("values",), ("bias",),
                                      ("z", "experts"), ("decoder", "values", "bias")])
def test_mxd_decode_op_gradient_subsets(dev, requires):
    inputs = make_inputs((11,), 19, 23, 8, 3, torch.float32, dev, seed=11)
    run_case(inputs, torch.float32, requires=requires)


def test_mxd_decode_op_repeated_experts(dev):
    """Repeated experts within a token and across tokens: their coefficients add up."""
    inputs = make_inputs((17,), 18, 21, 3, 5, torch.float32, dev, seed=13, unique=False)
    run_case(inputs, torch.float32, ref=ref_dense)


def test_mxd_decode_op_noncontiguous_inputs(dev):
    z, decoder, experts, values, indices, bias = make_inputs((15,), 22, 26, 10, 3, torch.float32, dev, seed=17)
    z = z.T.contiguous().T                      # column-major
    decoder = decoder.T.contiguous().T
    experts = experts.T.contiguous().T
    values = torch.cat([values, values], 1)[:, ::2]
    run_case((z, decoder, experts, values, indices, bias), torch.float32)


def test_mxd_decode_op_float64_and_float16(dev):
    for dtype in (torch.float64, torch.float16):
        inputs = make_inputs((9,), 16, 18, 7, 2, dtype, dev, seed=19)
        run_case(inputs, dtype)


def test_mxd_decode_backward_deterministic(dev):
    z, decoder, experts, values, indices, bias = make_inputs((33,), 16, 20, 4, 3, torch.bfloat16, dev, seed=23)
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(33, 20, generator=g).to(dev, torch.bfloat16)
    first = mdk.mxd_decode_backward(gy, z, decoder, experts, values, indices, True, True, True, True, True, True)
    again = mdk.mxd_decode_backward(gy, z, decoder, experts, values, indices, True, True, True, True, True, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_mxd_decode_out_of_range_index_masked(dev):
    """Direct kernel calls with indices the op layer would reject: masked, contributes zero."""
    z, decoder, experts, values, indices, bias = make_inputs((6,), 16, 17, 5, 2, torch.float32, dev, seed=29)
    bad = indices.clone()
    bad[1, 0], bad[4, 1] = -3, 5 + 10_000
    keep = (bad >= 0) & (bad < 5)
    vz = torch.where(keep, values, 0.0)
    y = mdk.mxd_decode_forward(z, decoder, experts, values, bad, bias)
    close(y, reference.mxd_decode(z.double(), decoder.double(), experts.double(), vz.double(), indices,
                                  bias.double()), torch.float32, "y")
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(6, 17, generator=g).to(dev)
    dz, ddec, dexp, dval, dbias = mdk.mxd_decode_backward(gy, z, decoder, experts, values, bad,
                                                         True, True, True, True, True, True)
    good = mdk.mxd_decode_backward(gy, z, decoder, experts, vz, indices, True, True, True, True, True, True)
    close(dz, good[0], torch.float32, "dz")
    close(ddec, good[1], torch.float32, "ddecoder")
    close(dexp, good[2], torch.float32, "dexperts")
    assert (dval[~keep] == 0).all()
    close(dval[keep], good[3][keep], torch.float32, "dvalues")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxd_decode_split_gemm_path(dev, dtype, monkeypatch):
    """The path exact fp32 takes on a GPU: library GEMM, then the gathered epilogue as its own pass."""
    monkeypatch.setattr(mdk, "SPLIT_GEMM", "always")
    for has_bias in (True, False):
        inputs = make_inputs((2, 9), 19, 29, 8, 3, dtype, dev, seed=31, has_bias=has_bias)
        run_case(inputs, dtype, grad_kind="strided")
    run_case(make_inputs((12,), 19, 29, 8, 3, dtype, dev, seed=37), dtype, requires=("experts",))


def test_mxd_decode_precomputed_epilogue_path(dev, monkeypatch):
    """The variant whose epilogue reads c~ precomputed by an embedding bag."""
    monkeypatch.setattr(mdk, "EPILOGUE_SOURCE", "precomputed")
    run_case(make_inputs((2, 9), 19, 29, 8, 3, torch.bfloat16, dev, seed=41), torch.bfloat16, grad_kind="strided")
    run_case(make_inputs((13,), 17, 21, 6, 6, torch.float32, dev, seed=43, has_bias=False), torch.float32)


@pytest.mark.parametrize("H,K", [(100, 3), (100, 1), (19, 3), (40, 3), (40, 6)])
def test_mxd_decode_interleaved_epilogue_path(dev, monkeypatch, H, K):
    """The variant that gathers c~ during the GEMM loop: fewer experts than GEMM steps (one gather every
    few steps), as many, and more (the rest gathered in the epilogue)."""
    monkeypatch.setattr(mdk, "EPILOGUE_SOURCE", "interleaved")
    run_case(make_inputs((2, 9), H, 29, 8, K, torch.bfloat16, dev, seed=53 + K), torch.bfloat16, grad_kind="strided")
    run_case(make_inputs((13,), H, 21, 6, K, torch.float32, dev, seed=59 + H, has_bias=False), torch.float32)


def test_mxd_decode_epilogue_from_environment(dev, monkeypatch):
    """MXD_FAST_TRITON_DECODE_EPILOGUE picks the variant; an unknown name is an error naming the variable."""
    monkeypatch.setenv("MXD_FAST_TRITON_DECODE_EPILOGUE", "interleaved")
    assert mdk.epilogue_source() == "interleaved"
    run_case(make_inputs((7,), 40, 21, 6, 3, torch.float32, dev, seed=61), torch.float32)
    monkeypatch.setenv("MXD_FAST_TRITON_DECODE_EPILOGUE", "fused")
    z, decoder, experts, values, indices, bias = make_inputs((7,), 40, 21, 6, 3, torch.float32, dev, seed=61)
    with pytest.raises(ValueError, match="MXD_FAST_TRITON_DECODE_EPILOGUE"):
        with mxd_fast.use_backend("triton"):
            mxd_fast.mxd_decode(z, decoder, experts, values, indices, bias)


@pytest.mark.parametrize("limit", [4000, 10])
def test_mxd_decode_offset_guard(dev, monkeypatch, limit):
    """Strided views whose in-tile offsets would overflow 32 bits are made contiguous (limit 4000
    here), or the torch backend runs when even that would overflow (limit 10)."""
    monkeypatch.setattr(mdk, "_INT32_MAX", limit)
    z, decoder, experts, values, indices, bias = make_inputs((15,), 22, 26, 10, 3, torch.float32, dev, seed=47)
    z = torch.cat([z, z], 1)[:, ::2]
    run_case((z, decoder, experts, values, indices, bias), torch.float32, grad_kind="strided")


def test_a_bias_stride_past_32_bit_tile_offsets(dev):
    """The bias's in-tile offset (BLOCK_N - 1) * stride overflowed 32 bits (a read far before the bias).
    CPU only: the view spans 9 GB of lazily mapped memory, of which 16 elements are touched."""
    if dev.type != "cpu":
        pytest.skip("needs lazily mapped host memory")
    O, stride = 16, 150_000_000                 # (16 - 1) * stride > 2^31 - 1 at the interpreter's BLOCK_N = 16
    try:
        store = torch.empty((O - 1) * stride + 1)
    except RuntimeError:
        pytest.skip("this machine does not map a 9 GB tensor lazily")
    bias = store.as_strided((O,), (stride,))
    bias.copy_(torch.arange(O, dtype=torch.float32))
    z, dec, ex = torch.zeros(2, 3), torch.zeros(3, O), torch.zeros(2, O)
    v, i = torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.int64)
    torch.testing.assert_close(mdk.mxd_decode_forward(z, dec, ex, v, i, bias), bias.expand(2, O))
