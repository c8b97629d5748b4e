"""Shared fixtures: each op test runs once per backend (torch; triton, marked `triton`; cuda, marked
`cuda`), on the backend's device, with kernel outputs poisoned (NaN) before the kernels run."""
from __future__ import annotations

import pytest
import torch

import mxd_fast
from mxd_fast._utils import poison_outputs
from mxd_fast.backend import unavailable_reason

BACKEND_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def backend_device(name: str) -> torch.device:
    if name == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """The backend name; the ops run under use_backend(name) and poison_outputs(). Skipped where the
    backend cannot run the module's OP."""
    name = request.param
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    op = getattr(request.module, "OP", None)    # the op a test module covers, if one
    reason = unavailable_reason(name, backend_device(name), op)
    if reason is not None:
        pytest.skip(reason)
    with mxd_fast.use_backend(name), poison_outputs():
        yield name


@pytest.fixture
def device(backend) -> torch.device:
    return backend_device(backend)


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}[dtype]


@pytest.fixture
def triton_device():
    """The device the Triton kernels run on here (the GPU, else the CPU under TRITON_INTERPRET=1),
    with use_backend("triton") and poison_outputs() in force; skipped where Triton cannot run."""
    device = backend_device("triton")
    reason = unavailable_reason("triton", device)
    if reason is not None:
        pytest.skip(reason)
    with mxd_fast.use_backend("triton"), poison_outputs():
        yield device
