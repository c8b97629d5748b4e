"""What is particular to the Triton kernels of mxd_decode (fused GEMM + gathered-expert epilogue, and its
backward): the split-GEMM path, the epilogue variants and the environment variable choosing them, the
32-bit offset guards; checked through the public op against the float64 dense reference with the spec's
tolerances. The op itself on every backend is tests/test_ops.py's, from mxd_fast.specs. On CPU they run
under TRITON_INTERPRET=1."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast.specs import SPECS, check_sample
from mxd_fast.specs.mxd_decode import random_inputs

pytest.importorskip("triton")
from mxd_fast.kernels import mxd_decode as mdk  # noqa: E402

pytestmark = pytest.mark.triton

SPEC = SPECS["mxd_decode"]


@pytest.fixture
def dev(triton_device):
    return triton_device


def make_inputs(lead, H, O, N, K, dtype, device, seed, has_bias=True):
    """A layer's decode inputs (decoder scaled by 1/sqrt(H), values in [0, 1) with zeros), as the spec's samples."""
    return random_inputs(lead, H, O, N, K, bias=has_bias, seed=seed, layer_like=True)(dtype, device)


def run_case(inputs, grad_kind="dense", requires=None):
    """The public op on `inputs` against the float64 reference: output and gradients (spec tolerances)."""
    check_sample(SPEC, inputs, requires=requires, grad_kinds=(grad_kind,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxd_decode_split_gemm_path(dev, dtype, monkeypatch):
    """The path exact fp32 takes on a GPU: library GEMM, then the gathered epilogue as its own pass."""
    monkeypatch.setattr(mdk, "SPLIT_GEMM", "always")
    for has_bias in (True, False):
        inputs = make_inputs((2, 9), 19, 29, 8, 3, dtype, dev, seed=31, has_bias=has_bias)
        run_case(inputs, grad_kind="strided")
    run_case(make_inputs((12,), 19, 29, 8, 3, dtype, dev, seed=37), requires=("experts",))


def test_mxd_decode_precomputed_epilogue_path(dev, monkeypatch):
    """The variant whose epilogue reads c~ precomputed by an embedding bag."""
    monkeypatch.setattr(mdk, "EPILOGUE_SOURCE", "precomputed")
    run_case(make_inputs((2, 9), 19, 29, 8, 3, torch.bfloat16, dev, seed=41), grad_kind="strided")
    run_case(make_inputs((13,), 17, 21, 6, 6, torch.float32, dev, seed=43, has_bias=False))


@pytest.mark.parametrize("H,K", [(100, 3), (100, 1), (19, 3), (40, 3), (40, 6)])
def test_mxd_decode_interleaved_epilogue_path(dev, monkeypatch, H, K):
    """The variant that gathers c~ during the GEMM loop: fewer experts than GEMM steps (one gather every
    few steps), as many, and more (the rest gathered in the epilogue)."""
    monkeypatch.setattr(mdk, "EPILOGUE_SOURCE", "interleaved")
    run_case(make_inputs((2, 9), H, 29, 8, K, torch.bfloat16, dev, seed=53 + K), grad_kind="strided")
    run_case(make_inputs((13,), H, 21, 6, K, torch.float32, dev, seed=59 + H, has_bias=False))


def test_mxd_decode_epilogue_from_environment(dev, monkeypatch):
    """MXD_FAST_TRITON_DECODE_EPILOGUE picks the variant; an unknown name is an error naming the variable."""
    monkeypatch.setenv("MXD_FAST_TRITON_DECODE_EPILOGUE", "interleaved")
    assert mdk.epilogue_source() == "interleaved"
    run_case(make_inputs((7,), 40, 21, 6, 3, torch.float32, dev, seed=61))
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
    run_case((z, decoder, experts, values, indices, bias), grad_kind="strided")


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
