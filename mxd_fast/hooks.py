"""Hook points (TransformerLens style) and steering for the mxd_fast layers. Imports only torch.

A `HookPoint` is an identity module placed where a layer's activations pass: a forward hook registered on it
reads what passes through and may replace it by returning a new value (TransformerLens semantics). A hook
point without hooks costs one Python call, and torch.compile sees hooks registered on it also after it has
compiled the layer (the point's `hooked` flag, which compiled code is guarded on, changes with them).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn


class Coefficients(NamedTuple):
    """The selected experts' (or latents') coefficients at each position: values [..., K] and their
    indices [..., K] (int64). K is the layer's k, or any number after a hook has edited them."""
    values: Tensor
    indices: Tensor


class _HookHandle:
    """The handle of a hook on a TracksHooks module: removing the hook also refreshes the module's
    `hooked` flag. Usable as a context manager, like torch's RemovableHandle."""

    def __init__(self, handle, module: "TracksHooks"):
        self._handle, self._module = handle, weakref.ref(module)
        self.id = handle.id

    def remove(self) -> None:
        self._handle.remove()
        module = self._module()
        if module is not None:
            module.refresh_hooked()

    def __enter__(self) -> "_HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _tracked(register):
    """nn.Module's `register` method, refreshing the module's `hooked` flag when a hook is added or removed."""
    def register_and_track(self, *args, **kwargs):
        handle = register(self, *args, **kwargs)
        self.refresh_hooked()
        return _HookHandle(handle, self)

    register_and_track.__name__ = register.__name__
    register_and_track.__doc__ = register.__doc__
    return register_and_track


class TracksHooks(nn.Module):
    """An nn.Module whose `hooked` attribute says whether any hook is registered on it (through its
    register_* methods, and until their handles remove them)."""

    def __init__(self):
        super().__init__()
        self.hooked = False

    def refresh_hooked(self) -> None:
        self.hooked = bool(self._forward_hooks or self._forward_pre_hooks or self._backward_hooks
                           or self._backward_pre_hooks)

    register_forward_hook = _tracked(nn.Module.register_forward_hook)
    register_forward_pre_hook = _tracked(nn.Module.register_forward_pre_hook)
    register_full_backward_hook = _tracked(nn.Module.register_full_backward_hook)
    register_full_backward_pre_hook = _tracked(nn.Module.register_full_backward_pre_hook)
    register_backward_hook = _tracked(nn.Module.register_backward_hook)


class HookPoint(TracksHooks):
    """Identity module: `register_forward_hook(hook)` on it sees what passes through as the hook's output
    argument, and a hook returning a value replaces it (None leaves it). Pre-hooks and backward hooks
    work as on any module."""

    def forward(self, value):
        return value


def hooked_call(module: TracksHooks, *args):
    """module(*args) with its hooks when any is registered, else module.forward(*args) (no hook
    dispatch; torch.compile is guarded on the `hooked` flag read here, so a hook registered later is seen)."""
    return module(*args) if module.hooked else module.forward(*args)


def coefficient_pair(where: str, pair) -> tuple[Tensor, Tensor]:
    """(values, indices) from what `where` passed on, which a hook may have replaced; TypeError naming
    `where` when it is not a pair of tensors."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, Tensor) for t in pair)):
        raise TypeError(f"{where} must pass on a pair of tensors (values, indices), got "
                        f"{type(pair).__name__}{f' of length {len(pair)}' if isinstance(pair, (tuple, list)) else ''}")
    return pair[0], pair[1]


def _coefficient_point(layer) -> tuple[HookPoint, int]:
    """(hook point, number of experts or latents) of an MxD's or TopKTranscoder's coefficients."""
    for name, count in (("hook_experts", "n_experts"), ("hook_latents", "width")):
        point = getattr(layer, name, None)
        if isinstance(point, HookPoint):
            return point, getattr(layer, count)
    raise TypeError(f"layer must be an mxd_fast.MxD or mxd_fast.TopKTranscoder (or torch.compile of one), "
                    f"got {type(layer).__name__}")


def steering_hook(expert: int, scale: float):
    """A forward hook for a coefficients hook point that adds `scale` to `expert`'s coefficient at every
    position: where the expert is selected, to its (first) entry; elsewhere through an appended entry
    (expert, scale). One column is appended everywhere ((expert, 0) where it was selected), so shapes
    stay static under torch.compile."""
    def add_expert(module, args, coefficients):
        values, indices = coefficient_pair("the coefficients given to steer's hook", coefficients)
        hit = indices == expert
        first_hit = hit & (hit.cumsum(-1) == 1)           # an expert listed twice gets scale once
        values = torch.where(first_hit, values + scale, values)
        appended = values.new_full((*values.shape[:-1], 1), scale).masked_fill(hit.any(-1, keepdim=True), 0)
        return Coefficients(torch.cat([values, appended], dim=-1),
                            torch.cat([indices, indices.new_full((*indices.shape[:-1], 1), expert)], dim=-1))
    return add_expert


@contextlib.contextmanager
def steer(layer, expert: int, scale: float):
    """Within the block, add `scale` to coefficient `expert` of `layer` at every position, whether or not
    top-k selected it (the paper's steering), through a hook on the layer's coefficients hook point
    (MxD: hook_experts; TopKTranscoder: hook_latents). Nest blocks to steer several experts.

        with mxd_fast.steer(layer, expert=123, scale=8.0):
            y = layer(x)          # expert 123's coefficient is raised by 8.0 at every token
    """
    point, count = _coefficient_point(layer)
    if isinstance(expert, bool) or not isinstance(expert, numbers.Integral):
        raise TypeError(f"expert must be an int, got {type(expert).__name__}")
    if not 0 <= expert < count:
        raise ValueError(f"expert must satisfy 0 <= expert < {count} (the layer's experts or latents), got {expert}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    handle = point.register_forward_hook(steering_hook(int(expert), float(scale)))
    try:
        yield layer
    finally:
        handle.remove()
