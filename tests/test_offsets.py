"""The host-side offset arithmetic of the Triton kernels, on meta tensors (shapes and strides only, no
memory): which launches keep 32-bit in-tile offsets, when an operand is made contiguous for it, and
when a size falls back to the torch backend. tests/test_gpu_scale.py runs real tensors past 2^31
elements on a GPU."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from mxd_fast.kernels import mxd_decode as md  # noqa: E402
from mxd_fast.kernels import topk_gate as tg  # noqa: E402

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


def test_an_output_row_too_wide_for_32_bit_tiles_falls_back(monkeypatch):
    # O so wide that BLOCK_M rows of the contiguous [B, O] output span more than 2^31 elements
    O = INT32_MAX // (BM - 1) + 1
    ops = decode_operands(O=O, decoder=meta((64, O)), experts=meta((1000, O)))
    assert md._fit_tiles(*ops) is None
    called = []
    monkeypatch.setattr(md._torch_impl, "mxd_decode_torch_forward", lambda *a: called.append(a) or "torch")
    assert md.mxd_decode_forward(*ops, None) == "torch" and len(called) == 1


def test_gate_limits_fall_back_to_the_torch_backend(monkeypatch):
    from mxd_fast.ops import topk_gate as op

    called = []
    monkeypatch.setattr(op, "topk_gate_torch_forward", lambda *a: called.append(a) or "torch")
    x = meta((4, 16))
    assert tg.topk_gate_forward(x, meta((tg._MAX_N + 1, 16)), None, 3) == "torch"     # N near 2^31
    assert tg.topk_gate_forward(x, meta((1000, 16)), None, tg.MAX_K + 1) == "torch"   # k beyond registers
    assert tg.topk_gate_forward(meta((4, 16), dtype=torch.float64), meta((1000, 16), dtype=torch.float64),
                                None, 3) == "torch"
    assert len(called) == 3
