"""One specification per op, in the spirit of PyTorch's OpInfo: its sample inputs, its dense reference
(mxd_fast.reference), the check of an implementation's outputs and gradients against that reference,
tolerances per dtype, and the FLOPs, compulsory bytes and inputs of its benchmark cases.

The tests of every backend (tests/test_ops.py) and the benchmark cases (bench/cases.py) are driven from
SPECS. Another package can check its own implementation of an op the same way:

    from mxd_fast.specs import SPECS, check_sample
    spec = SPECS["gather_combine"]
    for sample in spec.samples:
        for dtype in sample.dtypes:
            check_sample(spec, sample.inputs(dtype, "cpu"), op=my_gather_combine, **sample.check_arguments())

Importing this package imports neither pytest nor triton. Adding an op: a module here defining its SPEC,
listed in SPECS below.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Mapping

import torch

from ._check import GRAD_KINDS, assert_close, check_sample, compare_with_reference, make_grad
from ._make import random_selection


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Elementwise |actual - expected| <= rtol * |expected| + atol * max(1, max |expected|), against the
    float64 reference of the same (already rounded) inputs."""
    rtol: float
    atol: float


@dataclasses.dataclass(frozen=True)
class Sample:
    """One sample input of an op. build(dtype, device) returns the op's positional arguments (the same
    values for every call)."""
    name: str
    build: Callable[[torch.dtype, torch.device], tuple]
    dtypes: tuple[torch.dtype, ...]
    gradients: bool = True                  # check gradients: of every differentiable input, or of `requires`
    grad_kinds: tuple[str, ...] = ("dense",)   # the output gradients they are checked with (see make_grad)
    requires: tuple[str, ...] | None = None
    large: bool = False                     # GPU-size: run only on CUDA devices
    tags: frozenset[str] = frozenset()      # "deterministic", "subsets", "opcheck", "gradcheck"
    doc: str = ""

    def inputs(self, dtype: torch.dtype, device) -> tuple:
        return self.build(dtype, torch.device(device))

    def check_arguments(self) -> dict:
        """check_sample's keyword arguments for this sample: which gradients, with which output gradients."""
        if not self.gradients:
            return dict(requires=(), grad_kinds=())
        return dict(requires=self.requires, grad_kinds=self.grad_kinds)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything the tests and benchmarks know about one op.

    Benchmark dimensions (`dims`): any object with attributes T (tokens), d (the model width: the op's
    input width I for topk_gate, its output width O otherwise), H (hidden width), N (experts) and K
    (experts per token), such as bench.shapes.Shape."""
    name: str
    arg_names: tuple[str, ...]
    differentiable: tuple[str, ...]
    reference: Callable                          # the dense form, from mxd_fast.reference
    samples: tuple[Sample, ...]
    tolerances: Mapping[torch.dtype, Tolerance]
    # (spec, float64 arguments, the op's output, tolerance) -> None, raising AssertionError
    check_output: Callable[..., None]
    # (float64 arguments requiring gradients, the op's output) -> the reference's differentiable output
    differentiable_reference: Callable[[tuple, Any], torch.Tensor]
    primary: Callable[[Any], torch.Tensor]       # the op's differentiable output among its outputs
    flops: Callable[[Any, bool], tuple[float, float]]        # (dims, dense) -> (forward, backward)
    bytes: Callable[[Any, int], tuple[float, float]]         # (dims, element size) -> (forward, backward)
    workspace: Callable[[Any, int, bool, bool], int]         # (dims, element size, dense, backward) -> bytes
    # (dims, dtype, device, generator, backward) -> {argument name: value} in argument order, plus
    # "grad_out" (the gradient of the primary output) when backward
    bench_inputs: Callable[..., dict]
    gradient_subsets: tuple[tuple[str, ...], ...] = ()

    @property
    def op(self) -> Callable:
        """The public op, mxd_fast.<name> (runs on the backend in force)."""
        return getattr(importlib.import_module("mxd_fast"), self.name)

    def call(self, fn: Callable, inputs: Mapping[str, Any]):
        """fn (the op, its reference, or another implementation) on named inputs."""
        return fn(*(inputs[n] for n in self.arg_names))

    def sample(self, name: str) -> Sample:
        for s in self.samples:
            if s.name == name:
                return s
        raise KeyError(f"{self.name} has no sample {name!r}")

    def tagged(self, tag: str) -> tuple[Sample, ...]:
        return tuple(s for s in self.samples if tag in s.tags)

    def flops_of(self, dims, dense: bool, backward: bool) -> float:
        fwd, bwd = self.flops(dims, dense)
        return float(fwd + (bwd if backward else 0))

    def bytes_of(self, dims, element_size: int, backward: bool) -> float:
        fwd, bwd = self.bytes(dims, element_size)
        return float(fwd + (bwd if backward else 0))


def _unique_names(spec: OpSpec) -> OpSpec:
    names = [s.name for s in spec.samples]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"{spec.name}: sample names repeat: {sorted(duplicates)}")
    for s in spec.samples:
        unknown = set(s.grad_kinds) - set(GRAD_KINDS)
        if unknown:
            raise ValueError(f"{spec.name}/{s.name}: unknown grad kinds {sorted(unknown)}")
    return spec


from . import gather_combine, mxd_decode, topk_gate  # noqa: E402  (they use the classes above)

SPECS: dict[str, OpSpec] = {s.name: _unique_names(s) for s in (topk_gate.SPEC, gather_combine.SPEC, mxd_decode.SPEC)}

__all__ = ["GRAD_KINDS", "OpSpec", "SPECS", "Sample", "Tolerance", "assert_close", "check_sample",
           "compare_with_reference", "make_grad", "random_selection"]
