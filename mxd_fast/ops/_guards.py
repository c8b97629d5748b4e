"""The ops' Autograd kernel, and a clear error instead of a silent or cryptic one for inputs they cannot
take, also from the raw torch.ops.mxd_fast.* ops:
- reverse-mode torch.func transforms (grad, vjp, jacrev): the autograd.Function that register_autograd
  generates has no setup_context, which those transforms require (pytorch/pytorch#170834), so they raised.
  The op's Autograd kernel here applies a single-level autograd Function instead (the way torch.func
  builds its own graph nodes), with the op's registered setup_context and backward.
- forward-mode AD: a custom_op with register_autograd has reverse mode only, and under torch.func.jvp /
  jacfwd or torch.autograd.forward_ad it would silently return zero tangents. The op's Autograd kernel
  is wrapped with a check for tangents on its inputs.
- nested tensors: the dispatcher would name the op and a backend, not the argument. Kernels for the
  nested-tensor dispatch keys (strided layout) and the jagged layout's subclass run the op's own
  argument checks, which name the nested argument."""
from __future__ import annotations

import warnings

import torch
import torch.autograd.forward_ad as fwAD

try:   # torch internals: without them (another torch release) the guards are skipped, not the ops
    from torch._functorch.utils import enable_single_level_autograd_function
    from torch.autograd.function import _SingleLevelFunction
except ImportError:
    _SingleLevelFunction = None
try:
    from torch.nested._internal.nested_tensor import NestedTensor
except ImportError:
    NestedTensor = None

_lib = torch.library.Library("mxd_fast", "IMPL")


def _has_tangent(value, level: int) -> bool:
    return isinstance(value, torch.Tensor) and torch._VF._unpack_dual(value, level=level)[1] is not None


def _autograd_impl(op, op_def):
    """The op's Autograd kernel (keyset, *args): op_def's setup_context and backward (registered with
    register_autograd) in a single-level autograd Function. The ops take positional arguments only."""
    after_autograd = torch._C._after_autograd_keyset

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]
        # A single-level Function runs its forward with grad mode off; under nested torch.func transforms
        # the outer levels must still record the op, so grad mode goes back on for them.
        nested = torch._C._are_functorch_transforms_active()
        with torch._C._AutoDispatchBelowAutograd(), torch.set_grad_enabled(nested or torch.is_grad_enabled()):
            output = op.redispatch(keyset & after_autograd, *args)
        if op_def._setup_context_fn is not None:
            op_def._setup_context_fn(ctx=ctx, inputs=args, output=output)
        return output

    def backward(ctx, *grads):
        if op_def._backward_fn is None:   # a backward op
            raise RuntimeError(f"{op} has no derivative: mxd_fast's ops are differentiable once (no "
                               f"double backward, no torch.func.grad of a gradient)")
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = needs[:-1]   # the keyset argument
        try:
            result = op_def._backward_fn(ctx, *grads)
        finally:
            ctx.needs_input_grad = needs
        return (*result, None)

    function = type(f"mxd_fast_{op._opname}", (_SingleLevelFunction,),   # grad_fn: mxd_fast_<op>Backward
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def autograd_impl(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            with enable_single_level_autograd_function():
                return function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args)

    return autograd_impl


def register(op_def, check=None) -> None:
    """Install op_def's Autograd kernel (op_def made by torch.library.custom_op; a backward op has no
    autograd registered); check(*args) is the op's argument check (None: nested tensors are not checked)."""
    op = op_def._opoverload
    name = op._schema.name.split("::")[1]

    def checked(keyset, *args):
        level = fwAD._current_level
        if level >= 0 and any(_has_tangent(a, level) for a in args):
            raise NotImplementedError(
                f"mxd_fast.{name} has no forward-mode derivative (torch.func.jvp, jacfwd, "
                f"torch.autograd.forward_ad); use reverse mode (backward(), torch.autograd.grad, "
                f"torch.func.grad, vjp, jacrev)")
        return autograd_impl(keyset, *args)

    def refuse_nested(*args):
        if check is not None:
            check(*args)
        raise TypeError(f"mxd_fast.{name} takes no nested tensors")

    if _SingleLevelFunction is not None:
        autograd_impl = _autograd_impl(op, op_def)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "Overriding a previously registered kernel"
            # custom_op's own Autograd kernel is replaced (torch 2.11 refuses that without allow_override)
            _lib.impl(name, checked, "Autograd", with_keyset=True, allow_override=True)
    for key in ("NestedTensorCPU", "NestedTensorCUDA"):
        _lib.impl(name, refuse_nested, key)
    if NestedTensor is not None and hasattr(torch.library, "register_torch_dispatch"):
        torch.library.register_torch_dispatch(
            op, NestedTensor, lambda _cls, _func, _types, args, kwargs: refuse_nested(*args, **kwargs))
