"""mxd_fast.specs itself: every spec complete and consistent with its op, its checks able to fail (a wrong
selection, output or gradient is caught), the benchmark fields consistent with the op's shapes, and the
package importable without pytest or triton."""
from __future__ import annotations

import inspect
import subprocess
import sys
import types

import pytest
import torch

import mxd_fast
from mxd_fast.specs import SPECS, Tolerance, assert_close, check_sample
from mxd_fast.specs.topk_gate import check_selection

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
SPEC_PARAMS = [pytest.param(s, id=name) for name, s in SPECS.items()]


def test_importable_without_pytest_or_triton():
    code = ("import sys, mxd_fast.specs as s; assert s.SPECS; "
            "print(sorted(m for m in ('pytest', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_spec_matches_its_op(spec):
    assert spec.op is getattr(mxd_fast, spec.name)
    op_params = list(inspect.signature(spec.op).parameters)
    assert tuple(op_params) == spec.arg_names
    assert len(inspect.signature(spec.reference).parameters) == len(spec.arg_names)
    assert set(spec.differentiable) <= set(spec.arg_names)
    assert all(set(subset) <= set(spec.differentiable) for subset in spec.gradient_subsets)
    assert set(spec.tolerances) == set(DTYPES)
    for tag in ("deterministic", "opcheck"):
        assert spec.tagged(tag), tag
    for tag in ("subsets", "gradcheck"):
        assert len(spec.tagged(tag)) == 1, tag


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_samples_build_the_op_arguments(spec):
    """Every sample builds the op's arguments in each of its dtypes, the same values on every call."""
    for sample in spec.samples:
        if sample.large:
            continue
        for dtype in sample.dtypes:
            args = sample.inputs(dtype, "cpu")
            assert len(args) == len(spec.arg_names), sample.name
            floats = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            assert floats and all(a.dtype == dtype for a in floats), sample.name
            again = sample.inputs(dtype, "cpu")
            for a, b in zip(args, again):
                assert (torch.equal(a, b) or bool(torch.isnan(a).any())) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_bench_inputs_fit_the_op(spec):
    """The benchmark inputs are the op's arguments (plus grad_out shaped like the primary output), and
    the dense FLOPs are at least the sparse ones."""
    shape = types.SimpleNamespace(T=7, d=16, H=24, N=40, K=4)
    inputs = spec.bench_inputs(shape, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0), True)
    assert list(inputs)[:len(spec.arg_names)] == list(spec.arg_names)
    y = spec.primary(spec.call(spec.reference, inputs))
    assert inputs["grad_out"].shape == y.shape
    assert "grad_out" not in spec.bench_inputs(shape, torch.float32, "cpu", torch.Generator(), False)
    dense, sparse = spec.flops(shape, True), spec.flops(shape, False)
    assert all(d >= s > 0 for d, s in zip(dense, sparse))
    assert all(b > 0 for b in spec.bytes(shape, 4))


# ---- the checks fail on wrong results ------------------------------------------------------------

def _gate(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(6, 5, generator=g), torch.randn(12, 5, generator=g), torch.randn(12, generator=g)
    values, indices = torch.topk(torch.relu(x @ w.T + b), k)
    return x, w, b, values, indices


TOL32 = SPECS["topk_gate"].tolerances[torch.float32]


def test_check_selection_accepts_the_reference_and_any_tie():
    x, w, b, values, indices = _gate()
    check_selection(x, w, b, 3, values, indices, TOL32)
    x = torch.ones(2, 3)
    w = torch.ones(6, 3)
    tied = torch.tensor([[5, 2, 0], [1, 3, 4]])      # any three of six tied experts, in any order
    check_selection(x, w, None, 3, torch.full((2, 3), 3.0), tied, TOL32)


@pytest.mark.parametrize("fault", ["other_expert", "duplicate", "unsorted", "unwritten", "int32", "shape",
                                   "out_of_range", "value_off"])
def test_check_selection_rejects(fault):
    x, w, b, values, indices = _gate()
    values, indices = values.clone(), indices.clone()
    logits = torch.relu(x @ w.T + b)
    if fault == "other_expert":       # the row's smallest logit instead of its third largest
        indices[0, 2] = logits[0].argmin()
        values[0, 2] = logits[0].min()
        values[0] = values[0].sort(descending=True).values
    elif fault == "duplicate":
        indices[1, 1] = indices[1, 0]
    elif fault == "unsorted":
        values[2] = values[2].flip(0)
        indices[2] = indices[2].flip(0)
    elif fault == "unwritten":
        values[3, 1] = float("nan")
    elif fault == "int32":
        indices = indices.int()
    elif fault == "shape":
        values, indices = values[:, :2], indices[:, :2]
    elif fault == "out_of_range":
        indices[4, 0] = 12
    else:
        values[5, 0] += 1e-3
    with pytest.raises(AssertionError):
        check_selection(x, w, b, 3, values, indices, TOL32)


def test_assert_close_bound_and_special_values():
    tol = Tolerance(rtol=1e-3, atol=1e-3)
    e = torch.tensor([10.0, 0.0, float("inf"), float("nan")], dtype=torch.float64)
    assert_close(torch.tensor([10.019, 0.0099, float("inf"), float("nan")]), e, tol)   # bound 1e-3 * (|e| + 10)
    for bad in ([10.03, 0.0, float("inf"), float("nan")], [10.0, 0.011, float("inf"), float("nan")],
                [10.0, 0.0, 1e30, float("nan")], [10.0, 0.0, float("inf"), 0.0], [10.0, float("nan"), float("inf"),
                                                                                   float("nan")]):
        with pytest.raises(AssertionError):
            assert_close(torch.tensor(bad), e, tol)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(torch.zeros(3), e, tol)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; backward scales the gradient of the input by `factor`."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


@pytest.mark.parametrize("spec", SPEC_PARAMS)
def test_check_sample_catches_wrong_outputs_and_gradients(spec):
    sample = spec.tagged("subsets")[0]
    args = sample.inputs(torch.float32, "cpu")
    check_sample(spec, args)
    first = spec.arg_names.index(spec.differentiable[0])

    def off_output(*a):
        out = spec.op(*a)
        y = spec.primary(out)
        shifted = y + 1e-3 * y.detach().abs().max()
        return (shifted, *out[1:]) if isinstance(out, tuple) else shifted

    def scaled_gradient(*a):
        a = list(a)
        a[first] = _ScaledGradient.apply(a[first], 1.001)
        return spec.op(*a)

    def no_gradient(*a):
        a = list(a)
        a[first] = a[first].detach()
        return spec.op(*a)

    for wrong, message in ((off_output, "output|values"), (scaled_gradient, "gradient"),
                           (no_gradient, "gradient")):
        with pytest.raises(AssertionError, match=message):
            check_sample(spec, args, op=wrong)
