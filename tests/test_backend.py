"""Backend and determinism settings: a backward pass runs with the settings of its forward pass, also
when autograd runs it on another thread (as it does for CUDA tensors), and a setting holds for
threads that have none of their own."""
from __future__ import annotations

import threading

import pytest
import torch

import mxd_fast
from mxd_fast import backend as B
from mxd_fast.ops import _table


def _torch_function(op, direction):
    return _table.TABLE[op]["torch"].function(direction)


@pytest.fixture
def calls(monkeypatch):
    """Records (op, direction, backend, deterministic) of every kernel lookup; runs the torch kernels."""
    seen = []

    def spy(op, direction, device, args=None):
        seen.append((op, direction, B.get_backend(), B.deterministic()))
        return _torch_function(op, direction)

    monkeypatch.setattr(_table, "implementation", spy)
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


@pytest.mark.parametrize("archs,capability,covered", [
    ("8.0;9.0a", (8, 0), True), ("8.0;9.0a", (8, 6), True), ("8.0;9.0a", (8, 9), True),
    ("8.0;9.0a", (9, 0), True), ("8.0;9.0a", (7, 5), False), ("8.0;9.0a", (10, 0), False),
    ("8.0;9.0a", (12, 0), False), ("9.0a", (9, 0), True), ("8.6", (8, 0), False),
    ("7.5 8.0+PTX", (12, 0), True), ("7.5,8.0", (8, 9), True), ("9.0", (9, 0), True),
])
def test_archs_cover(archs, capability, covered):
    assert B.archs_cover(archs, capability) is covered


def test_backends_without_code_for_the_gpu_say_so(monkeypatch):
    from mxd_fast import _extension

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability 8.0 or newer" in B.unavailable_reason("triton", gpu)
    monkeypatch.setattr(_extension, "cuda_ops_loaded", lambda: True)
    monkeypatch.setattr(_extension, "cuda_arch_list", lambda: "8.0;9.0a")
    assert "TORCH_CUDA_ARCH_LIST='8.0;9.0a'" in B.unavailable_reason("cuda", gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert B.unavailable_reason("cuda", gpu) is None and B.unavailable_reason("triton", gpu) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    assert "no code for compute capability 10.0" in B.unavailable_reason("cuda", gpu)
    assert _table.resolve("gather_combine", gpu) != "cuda"     # auto moves on to the next backend


def test_torch_deterministic_algorithms_override_the_atomics_setting(calls):
    """torch.use_deterministic_algorithms(True) selects the deterministic kernels even where
    mxd_fast's own setting allows atomics."""
    layer = mxd_fast.MxD(6, 8, 5, 11, 3)
    x = torch.randn(4, 6)
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with mxd_fast.use_deterministic(False):
            assert B.deterministic()
            layer(x).square().sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)
    assert calls and all(c[3] for c in calls)
    with mxd_fast.use_deterministic(False):
        assert not B.deterministic()


def test_overlapping_blocks_in_two_threads_leave_no_setting_behind(monkeypatch):
    """Thread A enters its block, B enters its own, A exits, B exits: in between the block still
    active holds for threads without a setting of their own, afterwards none does."""
    monkeypatch.delenv("MXD_FAST_BACKEND", raising=False)
    monkeypatch.delenv("MXD_FAST_DETERMINISTIC", raising=False)
    a_in, b_in, a_out, b_look = (threading.Event() for _ in range(4))
    seen = {}

    def look(key):
        seen[key] = (B.get_backend(), B.deterministic())

    def a():
        with mxd_fast.use_backend("cuda"), mxd_fast.use_deterministic(False):
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with mxd_fast.use_backend("torch"), mxd_fast.use_deterministic(True):
            b_in.set()
            a_out.wait()
            _in_thread(lambda: look("b only"))
            look("b itself")

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    look("after")
    assert seen == {"b only": ("torch", True), "b itself": ("torch", True), "after": ("auto", True)}


def test_blocks_exiting_out_of_order_in_one_thread():
    """Blocks entered and exited out of order in one thread (generators, coroutines) restore nothing
    stale: the thread's innermost block still active holds."""
    outer, inner = mxd_fast.use_backend("cuda"), mxd_fast.use_backend("torch")
    outer.__enter__()
    inner.__enter__()
    outer.__exit__(None, None, None)
    assert B.get_backend() == "torch"
    inner.__exit__(None, None, None)
    assert B.get_backend() == "auto"


def test_settings_of_a_backward_pass_stay_in_its_thread(monkeypatch):
    """The settings a backward pass runs with (its forward's) are not seen by other threads."""
    monkeypatch.delenv("MXD_FAST_BACKEND", raising=False)
    seen = []

    def spy(op, direction, device, args=None):
        if direction == "backward":
            seen.append(B.get_backend())
            _in_thread(lambda: seen.append(B.get_backend()))
        return _torch_function(op, direction)

    monkeypatch.setattr(_table, "implementation", spy)
    w = torch.randn(9, 4, requires_grad=True)
    with mxd_fast.use_backend("triton"):
        y = mxd_fast.gather_combine(w, torch.randn(3, 2), torch.randint(0, 9, (3, 2)))
    _in_thread(lambda: y.sum().backward())
    assert seen == ["triton", "auto"]     # the backward's own thread, then a thread it starts


def test_interpreter_switched_on_after_triton_was_imported_is_refused():
    """TRITON_INTERPRET is read when triton decorates its functions: set later, the kernels would fail
    inside Triton. The backend says so instead."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    script = ("import os, torch, triton, mxd_fast\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "try:\n"
              "    with mxd_fast.use_backend('triton'):\n"
              "        mxd_fast.topk_gate(torch.randn(3, 4), torch.randn(5, 4), None, 2)\n"
              "except mxd_fast.BackendUnavailableError as err:\n"
              "    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "TRITON_INTERPRET=1 was set after triton was imported" in out.stdout, out.stdout + out.stderr


def test_triton_fp32_precision_follows_both_torch_apis():
    """The Triton kernels' fp32 dot precision follows torch's TF32 setting, whichever API set it. Once the
    new one (fp32_precision) is used, torch's legacy readers raise; the kernels must not."""
    import subprocess
    import sys
    pytest.importorskip("triton")
    script = (
        "import torch\n"
        "from mxd_fast.kernels import mxd_decode, topk_gate\n"
        "steps = [('pass', False),\n"
        "         ('torch.set_float32_matmul_precision(\"high\")', True),\n"
        "         ('torch.set_float32_matmul_precision(\"highest\")', False),\n"
        "         ('torch.backends.cuda.matmul.allow_tf32 = True', True),\n"
        "         ('torch.backends.cuda.matmul.allow_tf32 = False', False),\n"
        "         ('torch.backends.cuda.matmul.fp32_precision = \"tf32\"', True),\n"
        "         ('torch.backends.cuda.matmul.fp32_precision = \"ieee\"', False),\n"
        "         ('torch.backends.cuda.matmul.fp32_precision = \"none\"; torch.backends.fp32_precision = \"tf32\"', True)]\n"
        "for step, tf32 in steps:\n"
        "    exec(step)\n"
        "    got = (mxd_decode._precision(torch.float32), topk_gate._dot_precision(torch.float32))\n"
        "    want = ('tf32', 'tf32') if tf32 else ('ieee', 'tf32x3')\n"
        "    assert got == want, (step, got, want)\n"
        "    assert mxd_decode._precision(torch.bfloat16) == 'tf32'\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


def test_an_op_the_table_gives_only_a_torch_entry(monkeypatch):
    """An op without a Triton or CUDA entry: "auto" runs it on torch, a named backend says it has no kernel."""
    monkeypatch.setitem(_table.TABLE, "torch_only_op", {"torch": _table.TABLE["gather_combine"]["torch"]})
    monkeypatch.setattr(B, "unavailable_reason", lambda name, device: None)   # every backend runs on the device
    gpu = torch.device("cuda", 0)
    assert _table.resolve("torch_only_op", gpu) == "torch"
    assert _table.unavailable_reason("triton", gpu, "torch_only_op") == "there is no Triton kernel for torch_only_op"
    assert _table.unavailable_reason("cuda", gpu, "torch_only_op") == "the CUDA extension has no kernel for torch_only_op"
    with mxd_fast.use_backend("triton"):
        with pytest.raises(mxd_fast.BackendUnavailableError,
                           match="backend 'triton' cannot run torch_only_op: there is no Triton kernel"):
            _table.resolve("torch_only_op", gpu)
    assert _table.unavailable_reason("triton", gpu, "gather_combine") is None


def test_a_cuda_extension_without_the_op_says_so(monkeypatch):
    from mxd_fast import _extension

    if _extension.cuda_ops_loaded():
        pytest.skip("the CUDA extension is built: it has every op")
    monkeypatch.setattr(B, "unavailable_reason", lambda name, device: None)
    gpu = torch.device("cuda", 0)
    assert _table.unavailable_reason("cuda", gpu, "mxd_decode") == "the CUDA extension has no kernel for mxd_decode"
    assert _table.resolve("mxd_decode", gpu) == "triton"     # auto moves on


def test_triton_on_cuda_tensors_launches_on_their_device(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(_table, "resolve", lambda op, device: "triton")
    launch = _table.implementation("gather_combine", "forward", torch.device("cuda", 1))
    assert launch.func is _table._on_device and launch.args[1] == torch.device("cuda", 1)
    assert launch.args[0] is _table.TABLE["gather_combine"]["triton"].function("forward")
    assert _table.implementation("gather_combine", "forward", torch.device("cpu")) is launch.args[0]
