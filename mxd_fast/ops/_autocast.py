"""torch.autocast support: under autocast the ops cast their floating inputs to the autocast dtype
(like F.linear does), so an fp32 layer runs in bf16/fp16 without casting by hand. The backward ops
(reached when backward() is called inside the autocast region) take their inputs as they are. Either
way an op's own implementation runs with autocast off, so its internal matmuls keep its dtype. The
op's checks run first, on the caller's arguments, so that errors describe those and not the casts."""
from __future__ import annotations

import torch

_lib = torch.library.Library("mxd_fast", "IMPL")


_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # float64 stays, as under ATen's autocast


def _cast(value, device_type: str, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.dtype in _CAST_DTYPES and value.device.type == device_type:
        return value.to(dtype)
    return value


def register(op_name: str, cast: bool = True, check=None) -> None:
    """The op's autocast kernels: run check(*args, mixed_dtypes=True) if given, cast the floating inputs
    (cast=True) and call the op with autocast excluded."""
    op = getattr(torch.ops.mxd_fast, op_name).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def cast_and_call(*args, _device_type=device_type, _dispatch_key=dispatch_key):
            if check is not None:
                check(*args, mixed_dtypes=True)
            if cast:
                dtype = torch.get_autocast_dtype(_device_type)
                args = tuple(_cast(a, _device_type, dtype) for a in args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_dispatch_key)):
                return op(*args)

        op.py_impl(dispatch_key)(cast_and_call)     # seen by torch.compile's tracing
        _lib.impl(op_name, lambda _keyset, *args, _f=cast_and_call: _f(*args), key, with_keyset=True)
