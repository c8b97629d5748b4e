"""Backend and determinism settings: a backward pass runs with the settings of its forward pass, also
when autograd runs it on another thread (as it does for CUDA tensors), and a setting holds for
threads that have none of their own."""
from __future__ import annotations

import threading

import pytest
import torch

import mxd_fast
from mxd_fast import backend as B
from mxd_fast.ops import gather_combine as gc_op, mxd_decode as md_op, topk_gate as tg_op


@pytest.fixture
def calls(monkeypatch):
    """Records (op, direction, backend, deterministic) of every kernel lookup; runs the torch kernels."""
    seen = []

    def spy(op, direction, device, torch_impl):
        seen.append((op, direction, B.get_backend(), B.deterministic()))
        return torch_impl

    for module in (gc_op, md_op, tg_op):
        monkeypatch.setattr(module, "kernel", spy)
    return seen


def _in_thread(fn):
    errors = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if errors:
        raise errors[0]


def test_backward_on_another_thread_uses_the_forwards_settings(calls):
    layer = mxd_fast.MxD(6, 8, 5, 11, 3)
    x = torch.randn(4, 6)
    with mxd_fast.use_backend("triton"), mxd_fast.use_deterministic(False):
        loss = layer(x).square().sum()
    assert {c[2:] for c in calls} == {("triton", False)}
    calls.clear()
    _in_thread(loss.backward)      # no setting of its own, and none in force anywhere any more
    assert {c[0] for c in calls if c[1] == "backward"} == {"topk_gate", "mxd_decode"}
    assert {c[2:] for c in calls} == {("triton", False)}
    assert all(p.grad is not None for p in layer.parameters())


def test_gather_combine_backward_uses_the_forwards_settings(calls):
    w = torch.randn(9, 4, requires_grad=True)
    v = torch.randn(3, 2, requires_grad=True)
    idx = torch.randint(0, 9, (3, 2))
    with mxd_fast.use_backend("cuda"):
        y = mxd_fast.gather_combine(w, v, idx)
    calls.clear()
    _in_thread(lambda: y.sum().backward())
    assert calls == [("gather_combine", "backward", "cuda", True)]


def test_a_setting_holds_for_threads_without_their_own(monkeypatch):
    monkeypatch.delenv("MXD_FAST_BACKEND", raising=False)
    seen = {}

    def look(key):
        seen[key] = (B.get_backend(), B.deterministic())

    def own_setting():
        with mxd_fast.use_backend("torch"), mxd_fast.use_deterministic(True):
            look("own")

    with mxd_fast.use_backend("triton"), mxd_fast.use_deterministic(False):
        _in_thread(lambda: look("inside"))
        _in_thread(own_setting)
        assert (B.get_backend(), B.deterministic()) == ("triton", False)
    _in_thread(lambda: look("after"))
    assert seen == {"inside": ("triton", False), "own": ("torch", True), "after": ("auto", True)}
