"""gather_combine(weight, values, indices) -> y[b] = sum_j values[b, j] * weight[indices[b, j]]."""
from __future__ import annotations

import math

import torch

from .. import reference
from . import OpSpec, Sample, Tolerance
from ._check import compare_with_reference
from ._make import Draw, bench_randn, column_major, random_selection, zero_every

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

TOLERANCES = {F64: Tolerance(1e-12, 1e-12), F32: Tolerance(1.3e-6, 1e-5), BF16: Tolerance(1e-2, 1e-2),
              F16: Tolerance(2e-3, 2e-3)}


# ---- samples -------------------------------------------------------------------------------

def random_inputs(lead, n: int, o: int, k: int, unique: bool = True, seed: int = 0, zeros: bool = False,
            index_dtype=torch.int64, hot: int | None = None):
    """weight [n, o] and values [*lead, k] from N(0, 1) (every third value 0 if zeros), indices distinct per
    row (unique) or drawn with repeats; hot: every row's first selection is that expert."""
    def build(dtype, device):
        d = Draw(seed, dtype, device)
        weight, values = d.randn(n, o), d.randn(*lead, k)
        indices = d.selection(lead, n, k, unique=unique and k <= n)
        if zeros:
            values = zero_every(values, 3)
        if hot is not None:
            indices[..., 0] = hot
        return weight, values, indices.to(index_dtype)
    return build


def _unaligned_rows(dtype, device):
    """weight rows 67 elements apart, starting one element in: unit column stride, unaligned rows."""
    weight, values, indices = random_inputs((40,), 50, 67, 5, unique=False, seed=17)(dtype, device)
    return weight[:, 1:65], values, indices


def _column_major(dtype, device):
    weight, values, indices = random_inputs((40,), 50, 64, 5, unique=False, seed=20)(dtype, device)
    return column_major(weight), values, indices


def _samples() -> tuple[Sample, ...]:
    both = (F64, F32)
    out = []
    for name, lead, n, o, k in (("k1", (5,), 13, 7, 1), ("k_eq_n", (4,), 6, 9, 6), ("leading_dims", (2, 3), 37, 11, 4),
                                ("odd_sizes", (31,), 70, 33, 8)):
        out.append(Sample(name, random_inputs(lead, n, o, k), both))
        out.append(Sample(f"{name}_repeat", random_inputs(lead, n, o, k, unique=False, seed=1), both,
                          doc="experts repeat within a row: their values add up"))
    out.append(Sample("k_gt_n", random_inputs((3,), 4, 5, 9), both, doc="K > N: every row repeats experts"))
    every_grad = ("dense", "strided", "expanded")
    for name, lead, k, n, o in (("o37", (7,), 3, 11, 37), ("leading_k1", (2, 3), 1, 9, 20),
                                ("k_eq_n_o33", (4,), 6, 6, 33), ("empty_o17", (0,), 3, 5, 17),
                                ("empty_leading", (2, 0), 2, 4, 9)):
        out.append(Sample(name, random_inputs(lead, n, o, k, seed=sum(lead) + k + n, zeros=True), (F32, BF16),
                          grad_kinds=every_grad, doc="every third value 0"))
    out += [
        Sample("empty", random_inputs((0,), 8, 4, 2), (F32,), grad_kinds=("expanded",)),
        Sample("int32_indices", random_inputs((9,), 20, 5, 3, seed=2, index_dtype=torch.int32), (F64,),
               grad_kinds=("expanded",)),
        Sample("unaligned_rows", _unaligned_rows, (F32,), grad_kinds=("dense", "expanded")),
        Sample("column_major_weight", _column_major, (F32,)),
        Sample("hot_rows", random_inputs((64,), 10, 17, 5, unique=False, seed=3), (F32,),
               tags=frozenset({"deterministic"})),
        Sample("hot_rows_bf16", random_inputs((23,), 5, 19, 4, seed=6), (BF16,), tags=frozenset({"deterministic"}),
               doc="few rows, many tokens: long segments per row"),
        Sample("hot_expert_4096", random_inputs((4096,), 64, 96, 8, unique=False, seed=29, hot=0), (F32,), large=True,
               tags=frozenset({"deterministic"}), doc="every token selects expert 0"),
        Sample("subsets", random_inputs((6,), 7, 15, 2, unique=False, seed=5), (F32,), tags=frozenset({"subsets"})),
        Sample("opcheck", random_inputs((3, 2), 9, 5, 4, unique=False), (F32,), tags=frozenset({"opcheck"})),
        Sample("gradcheck", random_inputs((2, 3), 7, 4, 3, unique=False, seed=4), (F64,),
               tags=frozenset({"gradcheck"})),
    ]
    for o in (64, 63, 1):   # the CUDA kernels' vectorised rows, scalar rows (odd width), a single column
        out.append(Sample(f"rows_o{o}", random_inputs((300,), 500, o, 16, unique=False, seed=12, hot=3),
                          (F32, BF16, F16), large=True, doc="expert 3 selected by every token"))
    return tuple(out)


# ---- benchmark: FLOPs (2 per multiply-add), compulsory bytes, inputs ---------------------------

def _flops(s, dense: bool) -> tuple[float, float]:
    """Forward 2T(N or K)d; backward (dW, dvalues) 4T(N or K)d: dense providers multiply the [T, N]
    coefficients, sparse ones the K selected rows."""
    width = s.N if dense else s.K
    return 2 * s.T * width * s.d, 4 * s.T * width * s.d


def _bytes(s, es: int) -> tuple[float, float]:
    T, d, N, K = s.T, s.d, s.N, s.K
    sel = T * K * (es + 8)            # values + int64 indices
    gathered = T * K * d * es
    fwd = sel + gathered + T * d * es
    # read grad_y, selection; gathered rows of W (dvalues), of grad_y (dW); write dW, dvalues
    bwd = T * d * es + sel + 2 * gathered + N * d * es + T * K * es
    return fwd, bwd


def _workspace(s, es: int, dense: bool, backward: bool) -> int:
    T, d, N, K = s.T, s.d, s.N, s.K
    bn = T * N * es
    tile = (1 << 22) * 4              # the torch backend's gather chunks
    grads = es * (N * d + T * K) if backward else 0
    work = (3 * bn if backward else bn) if dense else tile + T * K * 24
    work += 2 * T * d * es
    return int(1.25 * (grads + work + T * K * (es + 8)))


def _bench_inputs(s, dtype, device, gen, backward: bool) -> dict:
    values, indices = random_selection(s.T, s.N, s.K, dtype, device, gen)
    inputs = {"weight": bench_randn((s.N, s.d), dtype, device, gen, 1 / math.sqrt(s.d)),
              "values": values, "indices": indices}
    if backward:
        inputs["grad_out"] = bench_randn((s.T, s.d), dtype, device, gen)
    return inputs


SPEC = OpSpec(
    name="gather_combine",
    arg_names=("weight", "values", "indices"),
    differentiable=("weight", "values"),
    reference=reference.gather_combine,
    samples=_samples(),
    tolerances=TOLERANCES,
    check_output=compare_with_reference,
    differentiable_reference=lambda refs, output: reference.gather_combine(*refs),
    primary=lambda output: output,
    flops=_flops,
    bytes=_bytes,
    workspace=_workspace,
    bench_inputs=_bench_inputs,
    gradient_subsets=(("weight",), ("values",)),
)
