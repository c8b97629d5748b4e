"""topk_gate(x, weight, bias, k) -> (values, indices): the k largest entries of relu(x @ weight.T + bias).

Between tied logits any of the tied experts may be selected, so an output is checked by what it must
satisfy (check_selection), and gradients against the dense form at the op's own selection."""
from __future__ import annotations

import math

import torch

from .. import reference
from . import OpSpec, Sample, Tolerance
from ._check import assert_close
from ._make import Draw, bench_randn, column_major

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
ALL_DTYPES = (F64, F32, BF16, F16)

# rtol 0: a selected value's error scales with the largest logit, not with its own size.
TOLERANCES = {F64: Tolerance(0.0, 1e-12), F32: Tolerance(0.0, 1e-5), BF16: Tolerance(0.0, 1e-2),
              F16: Tolerance(0.0, 2e-3)}


# ---- the check -----------------------------------------------------------------------------

def relu_logits(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """relu(x @ weight.T + bias) in float64 of the (already rounded) inputs, as in mxd_fast.reference."""
    logits = torch.einsum("...i,ni->...n", x.double(), weight.double())
    if bias is not None:
        logits = logits + bias.double()
    return torch.relu(logits)


def check_selection(x, weight, bias, k: int, values: torch.Tensor, indices: torch.Tensor,
                    tolerance: Tolerance) -> None:
    """The top-k of relu(logits) up to ties: values [..., k] sorted descending (NaN first, as in
    torch.topk) and equal to the reference's top-k values; indices int64, distinct in a row, pointing at
    logits equal to those values; and, in rows where the reference has a clear gap after its k-th value,
    the reference's set of experts."""
    lead, n = tuple(x.shape[:-1]), weight.shape[0]
    for name, t in (("values", values), ("indices", indices)):
        if tuple(t.shape) != (*lead, k):
            raise AssertionError(f"{name}: shape {tuple(t.shape)}, expected {(*lead, k)}")
    if indices.dtype != torch.int64:
        raise AssertionError(f"indices: dtype {indices.dtype}, expected torch.int64")
    logits = relu_logits(x, weight, bias).reshape(-1, n).cpu()
    v = values.detach().reshape(-1, k).cpu().double()
    i = indices.reshape(-1, k).cpu()
    if not ((i >= 0) & (i < n)).all():
        raise AssertionError("indices: an index outside [0, N)")
    if k > 1 and not (i.sort(dim=1).values.diff(dim=1) > 0).all():
        raise AssertionError("indices: an expert selected twice in a row")
    _check_sorted(v)
    ref = torch.topk(logits, min(k + 1, n), dim=1)
    assert_close(v, ref.values[:, :k], tolerance, "values")
    assert_close(v, logits.gather(1, i), tolerance, "values against their experts' logits")
    if k < n:
        _check_clear_sets(i, ref, k, tolerance)


def _check_sorted(v: torch.Tensor) -> None:
    nan = torch.isnan(v)
    if (nan[:, 1:] & ~nan[:, :-1]).any():
        raise AssertionError("values: a NaN after a number (NaN ranks first, as in torch.topk)")
    numbers = ~nan[:, 1:] & ~nan[:, :-1]
    if not (v[:, :-1] >= v[:, 1:])[numbers].all():
        raise AssertionError("values: not sorted descending")


def _check_clear_sets(i: torch.Tensor, ref, k: int, tolerance: Tolerance) -> None:
    """Where the k-th and (k+1)-th reference values are further apart than 4x the tolerance, no other
    expert could tie: the set of experts must be the reference's."""
    top = ref.values[:, :k]
    finite = top[torch.isfinite(top)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    bound = tolerance.rtol * ref.values[:, k - 1].abs() + tolerance.atol * scale
    gap = ref.values[:, k - 1] - ref.values[:, k]
    clear = torch.isfinite(gap) & (gap > 4 * bound)
    got = i[clear].sort(dim=1).values
    want = ref.indices[clear, :k].sort(dim=1).values
    if not torch.equal(got, want):
        raise AssertionError("indices: other experts than the reference's where its k-th value is clear")


def _check_output(spec, refs, output, tolerance) -> None:
    x, weight, bias, k = refs
    values, indices = output
    check_selection(x, weight, bias, k, values, indices, tolerance)


def _reference_at_selection(refs, output) -> torch.Tensor:
    """The dense form's values at the experts the op selected (its gradients are the reference's, also
    where ties let the op pick other experts than torch.topk)."""
    x, weight, bias, _ = refs
    indices = output[1].to(x.device)
    return relu_logits(x, weight, bias).gather(-1, indices)


# ---- samples -------------------------------------------------------------------------------

def random_inputs(lead, i: int, n: int, k: int, bias: bool = True, seed: int = 0, layout=None):
    """x [*lead, i], weight [n, i], bias [n] (or None) from N(0, 1); layout(x, w, b) rearranges them."""
    def build(dtype, device):
        d = Draw(seed, dtype, device)
        x, w = d.randn(*lead, i), d.randn(n, i)
        b = d.randn(n) if bias else None
        if layout is not None:
            x, w, b = layout(x, w, b)
        return x, w, b, k
    return build


def _strided_rows(x, w, b):
    """x with stride (42, 2), weight rows 126 apart, bias with stride 3 (views into larger tensors)."""
    big_x = torch.stack((x, x), dim=-1).flatten(-2)                              # [.., 2i]
    big_w = torch.stack((w, w, w), dim=1).reshape(w.shape[0], 3 * w.shape[1])     # rows of 3i
    big_w = torch.cat((big_w, big_w), dim=1)                                      # row stride 6i
    big_b = torch.stack((b, b, b), dim=-1).flatten()
    return big_x[..., ::2], big_w[:, :w.shape[1]], big_b[::3]


def _x_column_major(x, w, b):
    return column_major(x), w, b


def _weight_strided(x, w, b):
    """weight as a view with strides (2, 2n), no unit stride: every other column of a [i, 2n] tensor,
    transposed."""
    big = torch.stack((w.T, torch.zeros_like(w.T)), dim=-1).flatten(-2)    # [i, 2n]
    return x, big[:, ::2].T, b


def _strided_column_major(x, w, b):
    """x and bias strided as in _strided_rows, weight column-major."""
    x, _, b = _strided_rows(x, w, b)
    return x, column_major(w), b


def _ties(n: int, negative: slice, k: int, rows: int = 4, all_negative: bool = False):
    """x = 1, weight = +-1: every positive logit ties at 3.0, the rest (rows `negative` of weight, or all of
    them) are -3, relu'd to 0."""
    def build(dtype, device):
        x = torch.ones(rows, 3, dtype=dtype, device=device)
        w = torch.ones(n, 3, dtype=dtype, device=device)
        w[negative] = -1.0
        return x, -w.abs() if all_negative else w, None, k
    return build


def _integer_logits(dtype, device):
    """bf16 inputs with few distinct logits: ties at the threshold across tiles and chunks."""
    d = Draw(8, dtype, device)
    x = d.cast(torch.randint(-2, 3, (13, 16), generator=d.gen).double())
    w = d.cast(torch.randint(-1, 2, (77, 16), generator=d.gen).double())
    return x, w, None, 9


def _relu_masked(dtype, device):
    x, w, b, k = random_inputs((19,), 13, 41, 9, seed=12)(dtype, device)
    b = b.clone()
    b[::4] = -50.0          # some selected logits are relu'd zeros, which carry no gradient
    return x, w, b, k


def _bias_counts(dtype, device):
    """Thousands of tokens on four experts, every logit positive: the bias gradient counts selections (a sum
    kept in bf16 would stop counting at 256)."""
    x, w, b, k = random_inputs((4096,), 3, 4, 1, seed=6)(dtype, device)
    return x, w, b.abs() + 10, k


def _hot_expert(dtype, device):
    """Many rows select expert 7 (positive rows of x, a large positive row 7 of weight)."""
    x, w, b, k = random_inputs((513,), 20, 90, 12, seed=6)(dtype, device)
    w = w.clone()
    w[7] = 5 * w[7].abs()
    return x.abs(), w, b, k


def _nan_expert(dtype, device):
    """Expert 13's row is NaN: its logit ranks first in every row; row 0 has only zero logits besides."""
    d = Draw(4, dtype, device)
    x = torch.zeros(6, 5, dtype=dtype, device=device)
    x[1] = d.randn(5)
    w = d.randn(700, 5)
    w[13] = float("nan")
    return x, w, None, 20


def _samples() -> tuple[Sample, ...]:
    both = (F64, F32)
    out = []
    for name, lead, i, n, k in (("k1", (5,), 7, 13, 1), ("k_eq_n", (5,), 7, 13, 13),
                                ("leading_dims", (2, 3), 9, 37, 4), ("odd_sizes", (33,), 17, 70, 8),
                                ("n1", (1,), 3, 1, 1)):
        out.append(Sample(name, random_inputs(lead, i, n, k), both))
        out.append(Sample(f"{name}_nobias", random_inputs(lead, i, n, k, bias=False, seed=1), both))
    out += [
        Sample("no_block_multiple", random_inputs((37,), 23, 70, 5, seed=2), (F32,),
               doc="no size a multiple of a block"),
        Sample("k_eq_n_i16", random_inputs((9,), 16, 13, 13, seed=3), (F32,)),
        Sample("n1_rows3", random_inputs((3,), 5, 1, 1, seed=4), (F32,)),
        Sample("b1", random_inputs((1,), 3, 40, 3, seed=5), (F32,)),
        Sample("k17_bf16", random_inputs((20,), 33, 90, 17, seed=6), (BF16,), doc="k not a power of two"),
        Sample("fp16_nobias", random_inputs((11,), 19, 45, 6, bias=False, seed=7), (F16,)),
        Sample("leading_3x4", random_inputs((3, 4), 10, 30, 4, seed=7), (F32,)),
        Sample("x_column_major", random_inputs((8,), 12, 30, 5, seed=3, layout=_x_column_major), (F32,)),
        Sample("weight_strided", random_inputs((8,), 12, 30, 5, seed=3, layout=_weight_strided), (F32,),
               doc="weight with strides (2, 2n): no unit stride"),
        Sample("strided_x_weight_bias", random_inputs((17,), 21, 50, 6, seed=6, layout=_strided_rows), (F32,)),
        Sample("strided_x_column_major_weight", random_inputs((17,), 21, 50, 6, seed=6, layout=_strided_column_major),
               (F32,)),
        Sample("empty", random_inputs((0,), 4, 9, 3), (F64, F32)),
        Sample("empty_nobias", random_inputs((0,), 5, 9, 3, bias=False), (F32,)),
        Sample("empty_leading", random_inputs((2, 0), 4, 9, 3), (F32,)),
        Sample("ties_k7", _ties(10, slice(5, None), 7), (F64, F32), grad_kinds=("expanded", "dense"),
               doc="five tied positive logits, five negative"),
        *(Sample(f"ties_k{k}", _ties(21, slice(7, 14), k), (F32,), doc="14 tied positive logits, 7 negative")
          for k in (5, 14, 17, 21)),
        Sample("all_negative", _ties(21, slice(7, 14), 9, all_negative=True), (F32,),
               doc="every logit negative: all zero"),
        Sample("integer_logits", _integer_logits, (BF16,)),
        Sample("relu_masked", _relu_masked, (F32, BF16)),
        Sample("grad_of_sum", random_inputs((6,), 5, 19, 3, seed=2), (F64, F32), grad_kinds=("expanded",)),
        Sample("bias_counts", _bias_counts, (BF16, F16), grad_kinds=("expanded",), requires=("bias",)),
        Sample("nan_expert", _nan_expert, (F32,), gradients=False),
        Sample("hot_experts", random_inputs((64,), 12, 10, 4, seed=16), (F32,), tags=frozenset({"deterministic"}),
               doc="few experts, many tokens: every expert collects many contributions"),
        Sample("hot_expert_513", _hot_expert, (F32,), large=True, tags=frozenset({"deterministic"})),
        Sample("subsets", random_inputs((7,), 6, 23, 3, seed=14), (F32,), tags=frozenset({"subsets"})),
        Sample("opcheck_k3", random_inputs((3, 4), 6, 11, 3), (F32,), tags=frozenset({"opcheck"})),
        Sample("opcheck_k_eq_n_nobias", random_inputs((3, 4), 6, 11, 11, bias=False), (F32,),
               tags=frozenset({"opcheck"})),
        Sample("opcheck_k2", random_inputs((3, 4), 6, 11, 2), (F32,), tags=frozenset({"opcheck"})),
        Sample("gradcheck", random_inputs((2, 3), 4, 9, 3, seed=5), (F64,), tags=frozenset({"gradcheck"})),
    ]
    for name, b, i, n, k in (("tiles_3000", 3000, 24, 3000, 8), ("k1_n5000", 37, 33, 5000, 1),
                             ("k_eq_n_1024", 5, 16, 1024, 1024), ("k1500", 9, 8, 2500, 1500),
                             ("k_eq_n_300", 64, 40, 300, 300)):
        out.append(Sample(name, random_inputs((b,), i, n, k, seed=1), ALL_DTYPES, large=True))
    return tuple(out)


# ---- benchmark: FLOPs (2 per multiply-add), compulsory bytes, inputs ---------------------------

def _flops(s, dense: bool) -> tuple[float, float]:
    """Forward: the gate GEMM, 2TNd (every provider). Backward: dx and dW from the dense [T, N] gradient
    (4TNd) or from the K selected ones (4TKd)."""
    width = s.N if dense else s.K
    return 2 * s.T * s.N * s.d, 4 * s.T * width * s.d


def _bytes(s, es: int) -> tuple[float, float]:
    T, d, N, K = s.T, s.d, s.N, s.K
    sel = T * K * (es + 8)            # values + int64 indices
    gathered = T * K * d * es
    fwd = es * (T * d + N * d + N) + sel
    # read grad_values, values, indices, x; gathered rows of W (dx) and of x (dW); write dx, dW, dbias
    bwd = T * K * es + sel + T * d * es + 2 * gathered + es * (T * d + N * d + N)
    return fwd, bwd


def _workspace(s, es: int, dense: bool, backward: bool) -> int:
    T, d, N, K = s.T, s.d, s.N, s.K
    bn = T * N * es
    tile = (1 << 22) * 4              # the torch backend's tiles and gather chunks
    grads = es * (T * d + N * d + N) if backward else 0
    work = (4 * bn if backward else 2 * bn) if dense else 3 * tile
    return int(1.25 * (grads + work + T * K * (es + 8)))


def _bench_inputs(s, dtype, device, gen, backward: bool) -> dict:
    inputs = {"x": bench_randn((s.T, s.d), dtype, device, gen),
              "weight": bench_randn((s.N, s.d), dtype, device, gen, 1 / math.sqrt(s.d)),
              "bias": bench_randn((s.N,), dtype, device, gen, 0.1), "k": s.K}
    if backward:
        inputs["grad_out"] = bench_randn((s.T, s.K), dtype, device, gen)
    return inputs


SPEC = OpSpec(
    name="topk_gate",
    arg_names=("x", "weight", "bias", "k"),
    differentiable=("x", "weight", "bias"),
    reference=reference.topk_gate,
    samples=_samples(),
    tolerances=TOLERANCES,
    check_output=_check_output,
    differentiable_reference=_reference_at_selection,
    primary=lambda output: output[0],
    flops=_flops,
    bytes=_bytes,
    workspace=_workspace,
    bench_inputs=_bench_inputs,
    gradient_subsets=(("x",), ("weight",), ("bias",), ("x", "bias")),
)
