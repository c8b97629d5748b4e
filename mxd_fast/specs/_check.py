"""Checking an implementation of an op against its spec: the outputs against the float64 dense reference
of the same (rounded) inputs, then every gradient against the reference's. Failures raise AssertionError
naming the output or gradient."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

GRAD_KINDS = ("dense", "strided", "expanded")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance, name: str = "output") -> None:
    """actual (any floating dtype, any device) within `tolerance` of expected (float64 reference):
    |actual - expected| <= rtol * |expected| + atol * max(1, max |expected|), elementwise. Where the
    reference is NaN or infinite the result must be the same; everywhere else it must be finite (kernel
    outputs are poisoned with NaN in the tests, so an unwritten element fails here)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    finite = torch.isfinite(e)
    same_special = (a == e) | (torch.isnan(a) & torch.isnan(e))
    if not same_special[~finite].all():
        raise AssertionError(f"{name}: differs where the reference is NaN or infinite")
    a, e = a[finite], e[finite]
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: non-finite (unwritten?) element where the reference is finite")
    if e.numel() == 0:
        return
    scale = max(1.0, e.abs().max().item())
    bound = tolerance.rtol * e.abs() + tolerance.atol * scale
    err = (a - e).abs()
    if not (err <= bound).all():
        worst = int((err - bound).argmax())
        raise AssertionError(f"{name}: error {err[worst].item():.3g} at element {worst} exceeds the bound "
                             f"{bound[worst].item():.3g} (rtol={tolerance.rtol}, atol={tolerance.atol} x {scale:.3g})")


def make_grad(output: torch.Tensor, kind: str, seed: int = 0) -> torch.Tensor:
    """A gradient for `output`: "dense" (random, contiguous), "strided" (random, a view with stride 2 in the
    last dimension) or "expanded" (ones with stride 0, what output.sum() sends back)."""
    if kind == "expanded":
        return torch.ones((), dtype=output.dtype, device=output.device).expand(output.shape)
    gen = torch.Generator().manual_seed(seed)
    shape = (*output.shape[:-1], 2 * output.shape[-1]) if output.dim() else ()
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(output.device, output.dtype)
    if kind == "strided":
        return grad[..., ::2] if output.dim() else grad
    if kind == "dense":
        return grad[..., :output.shape[-1]].contiguous() if output.dim() else grad
    raise ValueError(f"grad kind must be one of {GRAD_KINDS}, got {kind!r}")


def _leaves(spec, args: Sequence, requires: Sequence[str], float64: bool) -> tuple:
    """The arguments as fresh leaves: floating tensors detached (float64 if asked), the differentiable
    ones named in `requires` requiring a gradient; everything else as it is."""
    out = []
    for name, a in zip(spec.arg_names, args):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().double() if float64 else a.detach().clone()
            a.requires_grad_(name in requires)
        out.append(a)
    return tuple(out)


def check_sample(spec, args: Sequence, op: Optional[Callable] = None, requires: Optional[Sequence[str]] = None,
                 grad_kinds: Sequence[str] = ("dense",), tolerance=None, seed: int = 0) -> None:
    """Run `op` (default: the public op, under whatever backend is in force) on `args` and check its outputs
    and the gradients of the differentiable inputs named in `requires` (default: all of them that are
    tensors), once per gradient kind, against the spec's float64 reference."""
    op = spec.op if op is None else op
    dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    tolerance = spec.tolerances[dtype] if tolerance is None else tolerance
    present = [n for n, a in zip(spec.arg_names, args) if n in spec.differentiable and isinstance(a, torch.Tensor)]
    wanted = present if requires is None else [n for n in present if n in requires]
    ours = _leaves(spec, args, wanted, float64=False)
    refs = _leaves(spec, args, wanted, float64=True)
    grad_enabled = torch.enable_grad() if wanted else torch.no_grad()
    with grad_enabled:
        output = op(*ours)
    y = spec.primary(output)
    if y.dtype != dtype:
        raise AssertionError(f"output: dtype {y.dtype}, expected {dtype}")
    spec.check_output(spec, refs, output, tolerance)
    if not wanted:
        return
    with torch.enable_grad():
        reference = spec.differentiable_reference(refs, output)
    grad_of = [ours[spec.arg_names.index(n)] for n in wanted]
    grad_ref = [refs[spec.arg_names.index(n)] for n in wanted]
    for i, kind in enumerate(grad_kinds):
        dy = make_grad(y, kind, seed=seed + i)
        got = torch.autograd.grad(y, grad_of, dy, retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(reference, grad_ref, dy.double(), retain_graph=True, allow_unused=True)
        for name, g, w, leaf in zip(wanted, got, want, grad_ref):
            label = f"gradient of {name} ({kind} output gradient)"
            if g is None:
                raise AssertionError(f"{label}: none computed")
            w = torch.zeros_like(leaf) if w is None else w
            if g.dtype != dtype:
                raise AssertionError(f"{label}: dtype {g.dtype}, expected {dtype}")
            assert_close(g, w, tolerance, label)


def compare_with_reference(spec, refs: Sequence, output, tolerance) -> None:
    """The output check of an op with one output: it matches the float64 reference."""
    assert_close(output, spec.reference(*refs), tolerance, "output")
