"""The host-side offset arithmetic of the Triton kernels, on meta tensors (shapes and strides only, no
memory): which launches keep 32-bit in-tile offsets, when an operand is made contiguous for it, which
arguments the kernels refuse and the backend table leaves to the torch backend. tests/test_gpu_scale.py runs real tensors past 2^31
elements on a GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mxd_fast.kernels import mxd_decode as md  # noqa: E402
from mxd_fast.kernels import topk_gate as tg  # noqa: E402
from mxd_fast.ops import _table  # noqa: E402

INT32_MAX = 2 ** 31 - 1
BM, BN, BH = md._TILE


def meta(shape, stride=None, dtype=torch.bfloat16):
    if stride is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def decode_operands(B=300, H=64, O=96, N=1000, K=8, **strided):
    ops = dict(z=meta((B, H)), decoder=meta((H, O)), experts=meta((N, O)), values=meta((B, K)),
               indices=meta((B, K), dtype=torch.int64))
    ops.update(strided)
    return ops["z"], ops["decoder"], ops["experts"], ops["values"], ops["indices"]


def test_span_is_the_largest_in_tile_offset():
    t = meta((10, 7), (100, 3))
    assert md._span(t, 4, 5) == 3 * 100 + 4 * 3


def test_large_tensors_with_small_tiles_fit():
    # experts far past 2^31 elements: only the tile origin (64-bit) is large, the in-tile offsets are not
    ops = decode_operands(N=3_000_000, O=2048, experts=meta((3_000_000, 2048)))
    assert 3_000_000 * 2048 > INT32_MAX
    assert md._tiles_fit(*ops)
    # a [B, O] output past 2^31 elements: the same
    big_b = decode_operands(B=2_000_000, O=2048, z=meta((2_000_000, 64)), values=meta((2_000_000, 8)),
                            indices=meta((2_000_000, 8), dtype=torch.int64))
    assert md._tiles_fit(*big_b)


@pytest.mark.parametrize("name,shape,stride", [
    ("z", (300, 64), (2 ** 26, 1)),            # rows of z far apart: a tile spans > 2^31
    ("decoder", (64, 96), (1, 2 ** 26)),       # column-major decoder with a huge column stride
    ("values", (300, 8), (2 ** 25, 1)),
    # each tile's offsets fit, but the pointers step by BLOCK_H rows of H, which does not
    ("z", (300, BH + 1), (1, INT32_MAX // BH + 1)),
    ("decoder", (BH + 1, 96), (INT32_MAX // BH + 1, 1)),
])
def test_a_strided_operand_whose_tile_overflows_is_made_contiguous(name, shape, stride):
    ops = decode_operands(**{name: meta(shape, stride, torch.int64 if name == "indices" else torch.bfloat16)})
    assert not md._tiles_fit(*ops)
    fixed = md._fit_tiles(*ops)
    assert fixed is not None and all(t.is_contiguous() for t in fixed)
    assert md._tiles_fit(*fixed)


def test_an_output_row_too_wide_for_32_bit_tiles_is_refused():
    # O so wide that BLOCK_M rows of the contiguous [B, O] output span more than 2^31 elements
    O = INT32_MAX // (BM - 1) + 1
    ops = decode_operands(O=O, decoder=meta((64, O)), experts=meta((1000, O)))
    assert md._fit_tiles(*ops) is None
    assert not md.forward_offsets_fit(*ops)
    assert not _table.TABLE["mxd_decode"]["triton"].supports("forward", (*ops, None))
    with pytest.raises(ValueError, match="in-tile offsets in 32 bits"):
        md.mxd_decode_forward(*ops, None)
    grad_y = meta((ops[0].shape[0], O))
    flags = (True, True, True, True, True, True)
    assert not _table.TABLE["mxd_decode"]["triton"].supports("backward", (grad_y, *ops, *flags))
    with pytest.raises(ValueError, match="in-tile offsets in 32 bits"):
        md.mxd_decode_backward(grad_y, *ops, *flags)
    # without an experts or values gradient the backward launches no fused kernel: any offsets do
    assert md.backward_offsets_fit(grad_y, *ops, need_c=False)
    assert _table.TABLE["mxd_decode"]["triton"].supports("backward", (grad_y, *ops, True, True, False, False, True, True))


def test_offsets_that_fit_once_contiguous_are_taken():
    ops = decode_operands(z=meta((300, 64), (2 ** 26, 1)))
    assert not md._tiles_fit(*ops)
    assert md.forward_offsets_fit(*ops)
    assert _table.TABLE["mxd_decode"]["triton"].supports("forward", (*ops, None))
    assert md.forward_offsets_fit(*decode_operands())


def test_the_split_gemm_path_takes_any_offsets(monkeypatch):
    """Exact fp32 on a GPU runs cuBLAS and an embedding bag, whose offsets are 64-bit: no limit there."""
    O = INT32_MAX // (BM - 1) + 1
    ops = decode_operands(O=O, decoder=meta((64, O)), experts=meta((1000, O)))
    monkeypatch.setattr(md, "SPLIT_GEMM", "always")
    assert md.forward_offsets_fit(*ops)
    assert md.backward_offsets_fit(meta((300, O)), *ops, need_c=True)


def test_float64_is_refused_by_the_kernels_and_left_to_torch():
    ops = [t if t.dtype == torch.int64 else t.to(torch.float64) for t in decode_operands()]
    assert not _table.TABLE["mxd_decode"]["triton"].supports("forward", (*ops, None))
    with pytest.raises(TypeError, match="float64"):
        md.mxd_decode_forward(*ops, None)
    with pytest.raises(TypeError, match="float64"):
        md.mxd_decode_backward(meta((300, 96), dtype=torch.float64), *ops, True, True, True, True, True, True)


def test_gate_limits_are_refused_by_the_kernel_and_left_to_torch():
    x = meta((4, 16))
    gate = _table.TABLE["topk_gate"]["triton"]
    cases = [((x, meta((tg.MAX_N + 1, 16)), None, 3), ValueError, "at most"),        # N near 2^31
             ((x, meta((1000, 16)), None, tg.MAX_K + 1), ValueError, "k <="),          # k beyond registers
             ((meta((4, 16), dtype=torch.float64), meta((1000, 16), dtype=torch.float64), None, 3), TypeError, "float64")]
    for args, error, message in cases:
        assert not gate.supports("forward", args)
        with pytest.raises(error, match=message):
            tg.topk_gate_forward(*args)
    assert gate.supports("forward", (x, meta((tg.MAX_N, 16)), None, tg.MAX_K))


def test_the_dispatcher_falls_back_to_torch_where_triton_does_not_support_the_arguments(monkeypatch):
    monkeypatch.setattr(_table, "resolve", lambda op, device: "triton")
    x, w = meta((4, 16)), meta((1000, 16))
    device = torch.device("meta")
    torch_forward = _table.TABLE["topk_gate"]["torch"].function("forward")
    triton_forward = _table.TABLE["topk_gate"]["triton"].function("forward")
    assert triton_forward is tg.topk_gate_forward
    assert _table.implementation("topk_gate", "forward", device, (x, w, None, 3)) is triton_forward
    assert _table.implementation("topk_gate", "forward", device, (x, w, None, tg.MAX_K + 1)) is torch_forward
    assert _table.implementation("topk_gate", "forward", device) is triton_forward   # no arguments: no fallback
