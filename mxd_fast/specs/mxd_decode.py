"""mxd_decode(z, decoder, experts, values, indices, bias) -> (z @ decoder) * gather_combine(experts, values,
indices) + bias."""
from __future__ import annotations

import math

import torch

from .. import reference
from . import OpSpec, Sample, Tolerance
from ._check import compare_with_reference
from ._make import Draw, bench_randn, column_major, every_other, random_selection, zero_every

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

TOLERANCES = {F64: Tolerance(1e-12, 1e-12), F32: Tolerance(1.3e-6, 1e-5), BF16: Tolerance(1e-2, 1e-2),
              F16: Tolerance(2e-3, 2e-3)}


# ---- samples -------------------------------------------------------------------------------

def random_inputs(lead, h: int, o: int, n: int, k: int, bias: bool = True, seed: int = 0, unique: bool = True,
            layer_like: bool = False, hot: int | None = None):
    """z [*lead, h], decoder [h, o], experts [n, o], values [*lead, k], bias [o] from N(0, 1); indices
    distinct per row (unique) or drawn with repeats. layer_like: decoder scaled by 1/sqrt(h) and values
    from U(0, 1) with every fourth 0, as after the gate's relu. hot: every row's first selection is
    that expert."""
    def build(dtype, device):
        d = Draw(seed, dtype, device)
        z, decoder, experts = d.randn(*lead, h), d.randn(h, o, scale=h ** -0.5 if layer_like else 1.0), d.randn(n, o)
        indices = d.selection(lead, n, k, unique=unique and k <= n)
        values = zero_every(d.rand(*lead, k), 4) if layer_like else d.randn(*lead, k)
        if hot is not None:
            indices[..., 0] = hot
        return z, decoder, experts, values, indices, d.randn(o) if bias else None
    return build


def _non_contiguous(dtype, device):
    """z, decoder and experts column-major, values with stride 2."""
    build = random_inputs((15,), 22, 26, 10, 3, seed=17, layer_like=True)
    z, decoder, experts, values, indices, bias = build(dtype, device)
    return column_major(z), column_major(decoder), column_major(experts), every_other(values), indices, bias


def _samples() -> tuple[Sample, ...]:
    both = (F64, F32)
    out = []
    for name, lead, h, o, n, k in (("k1", (5,), 6, 7, 13, 1), ("k_eq_n", (4,), 5, 3, 6, 6),
                                   ("leading_dims", (2, 3), 9, 11, 37, 4), ("odd_sizes", (33,), 20, 17, 70, 8)):
        out.append(Sample(name, random_inputs(lead, h, o, n, k), both))
        out.append(Sample(f"{name}_nobias", random_inputs(lead, h, o, n, k, bias=False, seed=1), both))
    for name, lead, h, o, n, k in (("h20_o37", (13,), 20, 37, 11, 3), ("h40_k1", (37,), 40, 19, 7, 1),
                                   ("leading_k_eq_n", (2, 5), 17, 33, 6, 6), ("empty", (0,), 9, 11, 5, 2),
                                   ("empty_leading", (3, 0), 8, 5, 4, 4)):
        seed = h * 100 + o
        out.append(Sample(name, random_inputs(lead, h, o, n, k, seed=seed, layer_like=True), (F32, BF16)))
        out.append(Sample(f"{name}_nobias", random_inputs(lead, h, o, n, k, bias=False, seed=seed + 1, layer_like=True),
                          (F32, BF16)))
    out += [
        Sample("k_gt_n", random_inputs((5,), 6, 4, 9, 33, seed=3, unique=False), (F64,),
               doc="K > N: every row repeats experts"),
        Sample("grad_of_sum", random_inputs((7,), 4, 6, 15, 3, seed=2), (F64,), grad_kinds=("expanded",)),
        Sample("experts_grad_of_sum", random_inputs((7,), 4, 6, 15, 3, seed=2), (F64,), grad_kinds=("expanded",),
               requires=("experts",), doc="only experts requires a gradient"),
        Sample("empty_h4", random_inputs((0,), 4, 5, 6, 2), (F32,)),
        Sample("grad_strides", random_inputs((3, 7), 21, 35, 9, 4, seed=7, layer_like=True), (F32, BF16),
               grad_kinds=("strided", "expanded")),
        Sample("repeated_experts", random_inputs((17,), 18, 21, 3, 5, seed=13, unique=False, layer_like=True), (F32,),
               doc="experts repeat within a token and across tokens: their coefficients add up"),
        Sample("non_contiguous", _non_contiguous, (F32,)),
        Sample("h16_k2", random_inputs((9,), 16, 18, 7, 2, seed=19, layer_like=True), (F64, F16)),
        Sample("hot_rows_bf16", random_inputs((33,), 16, 20, 4, 3, seed=23, layer_like=True), (BF16,),
               tags=frozenset({"deterministic"})),
        Sample("subsets", random_inputs((11,), 19, 23, 8, 3, seed=11, layer_like=True), (F32,),
               tags=frozenset({"subsets"})),
        Sample("opcheck", random_inputs((3, 2), 5, 4, 9, 3), (F32,), tags=frozenset({"opcheck"})),
        Sample("opcheck_nobias", random_inputs((3, 2), 5, 4, 9, 3, bias=False), (F32,), tags=frozenset({"opcheck"})),
        Sample("gradcheck", random_inputs((2, 3), 4, 5, 8, 3, seed=3), (F64,), tags=frozenset({"gradcheck"})),
    ]
    for o in (64, 63, 1):   # the CUDA kernels' vectorised rows, scalar rows (odd width), a single column
        out.append(Sample(f"rows_o{o}", random_inputs((300,), 24, o, 500, 16, seed=10, unique=False, hot=3),
                          (F32, BF16, F16), large=True, doc="expert 3 selected by every token"))
    return tuple(out)


# ---- benchmark: FLOPs (2 per multiply-add), compulsory bytes, inputs ---------------------------

def _flops(s, dense: bool) -> tuple[float, float]:
    """Forward 2THd (z @ decoder) + 2T(N or K)d (the expert mixture) + 2Td (their product); backward 4THd
    (dz, ddecoder) + 4T(N or K)d (dexperts, dvalues) + 2Td."""
    T, d, H = s.T, s.d, s.H
    width = s.N if dense else s.K
    return 2 * T * H * d + 2 * T * width * d + 2 * T * d, 4 * T * H * d + 4 * T * width * d + 2 * T * d


def _bytes(s, es: int) -> tuple[float, float]:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    sel = T * K * (es + 8)            # values + int64 indices
    gathered = T * K * d * es
    fwd = es * (T * H + H * d + d) + sel + gathered + T * d * es
    bwd = (es * (T * d + T * H + H * d) + sel + 2 * gathered
           + es * (T * H + H * d + N * d + T * K + d))
    return fwd, bwd


def _workspace(s, es: int, dense: bool, backward: bool) -> int:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    bn = T * N * es
    tile = (1 << 22) * 4              # the torch backend's gather chunks
    grads = es * (T * H + H * d + N * d + T * K + d) if backward else 0
    work = (3 * bn if backward else bn) if dense else tile + T * K * 24
    work += 6 * T * d * es
    return int(1.25 * (grads + work + T * K * (es + 8)))


def _bench_inputs(s, dtype, device, gen, backward: bool) -> dict:
    values, indices = random_selection(s.T, s.N, s.K, dtype, device, gen)
    experts = torch.randn(s.N, s.d, device=device, generator=gen)
    experts /= experts.norm(dim=1, keepdim=True)          # unit rows, as the paper keeps them
    inputs = {"z": bench_randn((s.T, s.H), dtype, device, gen),
              "decoder": bench_randn((s.H, s.d), dtype, device, gen, 1 / math.sqrt(s.H)),
              "experts": experts.to(dtype), "values": values, "indices": indices,
              "bias": bench_randn((s.d,), dtype, device, gen, 0.1)}
    if backward:
        inputs["grad_out"] = bench_randn((s.T, s.d), dtype, device, gen)
    return inputs


SPEC = OpSpec(
    name="mxd_decode",
    arg_names=("z", "decoder", "experts", "values", "indices", "bias"),
    differentiable=("z", "decoder", "experts", "values", "bias"),
    reference=reference.mxd_decode,
    samples=_samples(),
    tolerances=TOLERANCES,
    check_output=compare_with_reference,
    differentiable_reference=lambda refs, output: reference.mxd_decode(*refs),
    primary=lambda output: output,
    flops=_flops,
    bytes=_bytes,
    workspace=_workspace,
    bench_inputs=_bench_inputs,
    gradient_subsets=(("z",), ("decoder",), ("experts",), ("values",), ("bias",), ("z", "experts"),
                      ("decoder", "values", "bias")),
)
