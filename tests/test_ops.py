"""Every op on every backend, driven by mxd_fast.specs: each sample of each op's spec, in each of its
dtypes, through the public op under use_backend(name) with outputs poisoned; outputs and the gradient of
every differentiable input checked against the float64 dense reference. Also per op: gradients of
subsets of the inputs, bitwise reproducible backward passes, torch.library.opcheck and gradcheck.

Backends come from conftest.BACKEND_PARAMS (triton cases are marked `triton`, cuda ones `cuda`); a new
backend needs no edit here. GPU-size samples (Sample.large) are collected only where CUDA is present."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from conftest import BACKEND_PARAMS, running_on
from mxd_fast.specs import SPECS, check_sample, make_grad

DTYPE_IDS = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _per_backend(rows):
    """pytest params (spec, backend, *row) for every backend, carrying the backend's marks."""
    for spec, ident, *row in rows:
        for b in BACKEND_PARAMS:
            name = b.values[0]
            yield pytest.param(spec, name, *row, id=f"{spec.name}-{name}-{ident}", marks=b.marks)


def _sample_rows():
    gpu = torch.cuda.is_available()
    for spec in SPECS.values():
        for s in spec.samples:
            if s.large and not gpu:
                continue
            for dtype in s.dtypes:
                yield spec, f"{s.name}-{DTYPE_IDS[dtype]}", s, dtype


@pytest.mark.parametrize("spec,backend,sample,dtype", list(_per_backend(_sample_rows())))
def test_sample(spec, backend, sample, dtype):
    with running_on(backend, spec.name) as device:
        if sample.large and device.type != "cuda":
            pytest.skip("a GPU-size sample")
        args = sample.inputs(dtype, device)
        check_sample(spec, args, **sample.check_arguments())


def _subset_rows():
    for spec in SPECS.values():
        for subset in spec.gradient_subsets:
            yield spec, "+".join(subset), subset


@pytest.mark.parametrize("spec,backend,subset", list(_per_backend(_subset_rows())))
def test_gradient_subsets(spec, backend, subset):
    """Only some inputs require a gradient: the backward computes those (and only those) correctly."""
    (sample,) = spec.tagged("subsets")
    with running_on(backend, spec.name) as device:
        check_sample(spec, sample.inputs(torch.float32, device), requires=subset, grad_kinds=("dense",))


def _deterministic_rows():
    gpu = torch.cuda.is_available()
    for spec in SPECS.values():
        for s in spec.tagged("deterministic"):
            if s.large and not gpu:
                continue
            for dtype in s.dtypes:
                yield spec, f"{s.name}-{DTYPE_IDS[dtype]}", s, dtype


def _forward_backward(spec, args):
    """The primary output and the gradients of every differentiable floating input (a fixed random
    output gradient)."""
    leaves = [a.detach().clone().requires_grad_(n in spec.differentiable)
              if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for n, a in zip(spec.arg_names, args)]
    y = spec.primary(spec.op(*leaves))
    wanted = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    return [y.detach(), *torch.autograd.grad(y, wanted, make_grad(y, "dense", seed=17))]


@pytest.mark.parametrize("spec,backend,sample,dtype", list(_per_backend(_deterministic_rows())))
def test_backward_is_bitwise_reproducible(spec, backend, sample, dtype):
    """Hot experts (many tokens on few experts): with determinism on, runs agree bit for bit (three on a GPU,
    where the order of atomics would vary; two elsewhere)."""
    with running_on(backend, spec.name) as device:
        if sample.large and device.type != "cuda":
            pytest.skip("a GPU-size sample")
        args = sample.inputs(dtype, device)
        with mxd_fast.use_deterministic(True):
            runs = [_forward_backward(spec, args) for _ in range(3 if device.type == "cuda" else 2)]
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def _requires_grad(spec, args, flag: bool) -> tuple:
    return tuple(a.detach().clone().requires_grad_(flag)
                 if n in spec.differentiable and isinstance(a, torch.Tensor) else a
                 for n, a in zip(spec.arg_names, args))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("spec,sample", [pytest.param(spec, s, id=f"{spec.name}-{s.name}")
                                         for spec in SPECS.values() for s in spec.tagged("opcheck")])
def test_opcheck(spec, sample, requires_grad):
    args = _requires_grad(spec, sample.inputs(sample.dtypes[0], "cpu"), requires_grad)
    torch.library.opcheck(getattr(torch.ops.mxd_fast, spec.name).default, args)


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_gradcheck(spec):
    (sample,) = spec.tagged("gradcheck")
    args = _requires_grad(spec, sample.inputs(torch.float64, "cpu"), True)
    positions = [i for i, (n, a) in enumerate(zip(spec.arg_names, args))
                 if n in spec.differentiable and isinstance(a, torch.Tensor)]

    def primary(*leaves):
        full = list(args)
        for i, leaf in zip(positions, leaves):
            full[i] = leaf
        return spec.primary(spec.op(*full))

    assert torch.autograd.gradcheck(primary, tuple(args[i] for i in positions))
