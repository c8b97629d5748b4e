"""Inputs the ops cannot take get a clear error instead of a silent or cryptic one, also from the raw
torch.ops.mxd_fast.* ops:
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
    from torch._library.autograd import make_autograd_impl
except ImportError:
    make_autograd_impl = None
try:
    from torch.nested._internal.nested_tensor import NestedTensor
except ImportError:
    NestedTensor = None

_lib = torch.library.Library("mxd_fast", "IMPL")


def _has_tangent(value, level: int) -> bool:
    return isinstance(value, torch.Tensor) and torch._VF._unpack_dual(value, level=level)[1] is not None


def register(op_def, check) -> None:
    """Guard op_def (made by torch.library.custom_op); check(*args) is the op's argument check."""
    op = op_def._opoverload
    name = op._schema.name.split("::")[1]

    def checked(keyset, *args, **kwargs):
        level = fwAD._current_level
        if level >= 0 and any(_has_tangent(a, level) for a in args):
            raise NotImplementedError(
                f"mxd_fast.{name} has no forward-mode derivative (torch.func.jvp, jacfwd, "
                f"torch.autograd.forward_ad); use reverse mode (backward(), torch.autograd.grad)")
        return autograd_impl(keyset, *args, **kwargs)

    def refuse_nested(*args):
        check(*args)
        raise TypeError(f"mxd_fast.{name} takes no nested tensors")

    if make_autograd_impl is not None:
        autograd_impl = make_autograd_impl(op, op_def)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "Overriding a previously registered kernel"
            _lib.impl(name, checked, "Autograd", with_keyset=True)
    for key in ("NestedTensorCPU", "NestedTensorCUDA"):
        _lib.impl(name, refuse_nested, key)
    if NestedTensor is not None and hasattr(torch.library, "register_torch_dispatch"):
        torch.library.register_torch_dispatch(
            op, NestedTensor, lambda _cls, _func, _types, args, kwargs: refuse_nested(*args, **kwargs))
