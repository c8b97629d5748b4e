"""Bad input gets a clear exception that names the argument, from the public functions and from
torch.ops.mxd_fast.* alike."""
import os
import subprocess
import sys

import pytest
import torch

import mxd_fast

f32, f64 = torch.float32, torch.float64


@pytest.mark.parametrize("old", ["2.8.0+cu128", "1.13.1"])
def test_a_torch_older_than_the_oldest_supported_is_refused_at_import_naming_both(old):
    from mxd_fast._version import MIN_TORCH
    proc = subprocess.run([sys.executable, "-c", f"import torch; torch.__version__ = {old!r}; import mxd_fast"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert f"ImportError: mxd_fast needs torch >= {MIN_TORCH}, found torch {old}" in proc.stderr, proc.stderr


def gate_args(**over):
    args = dict(x=torch.randn(4, 6), weight=torch.randn(10, 6), bias=torch.randn(10), k=3)
    args.update(over)
    return args


def gc_args(**over):
    args = dict(weight=torch.randn(10, 5), values=torch.randn(4, 3), indices=torch.randint(0, 10, (4, 3)))
    args.update(over)
    return args


def decode_args(**over):
    args = dict(z=torch.randn(4, 7), decoder=torch.randn(7, 5), experts=torch.randn(10, 5), values=torch.randn(4, 3),
                indices=torch.randint(0, 10, (4, 3)), bias=torch.randn(5))
    args.update(over)
    return args


GATE_CASES = [
    (dict(k=0), ValueError, "k"), (dict(k=11), ValueError, "k"), (dict(k=2.5), TypeError, "k"),
    (dict(k=True), TypeError, "k"),
    (dict(x=torch.randn(4, 5)), ValueError, "weight"), (dict(weight=torch.randn(10)), ValueError, "weight"),
    (dict(x=torch.randint(0, 3, (4, 6))), TypeError, "x"), (dict(weight=torch.randn(10, 6, dtype=f64)), TypeError, "weight"),
    (dict(bias=torch.randn(9)), ValueError, "bias"), (dict(bias=torch.randn(10, dtype=f64)), TypeError, "bias"),
    (dict(x=[1.0, 2.0]), TypeError, "x"), (dict(x=torch.tensor(1.0)), ValueError, "x"),
    (dict(x=torch.nested.nested_tensor([torch.randn(2, 6), torch.randn(3, 6)], layout=torch.jagged)), TypeError,
     "x must be a dense .* got a nested tensor"),
]
GC_CASES = [
    (dict(indices=torch.tensor([[0, 1, 10]] * 4)), IndexError, "indices"),
    (dict(indices=torch.tensor([[0, -1, 2]] * 4)), IndexError, "indices"),
    (dict(indices=torch.randint(0, 10, (4, 2))), ValueError, "values and indices"),
    (dict(indices=torch.randint(0, 10, (4, 3)).float()), TypeError, "indices"),
    (dict(values=torch.randn(4, 3, dtype=f64)), TypeError, "values"),
    (dict(weight=torch.randn(10, 5, 1)), ValueError, "weight"),
    (dict(values=torch.randn(4, 0), indices=torch.zeros(4, 0, dtype=torch.int64)), ValueError, "values"),
    (dict(weight=torch.randn(0, 5), values=torch.randn(0, 3), indices=torch.zeros(0, 3, dtype=torch.int64)),
     ValueError, "weight must have at least one row"),
    (dict(values=torch.nested.nested_tensor([torch.randn(3), torch.randn(3)])), TypeError,
     "values must be a dense .* got a nested tensor"),
]
DECODE_CASES = [
    (dict(decoder=torch.randn(6, 5)), ValueError, "decoder"), (dict(experts=torch.randn(10, 4)), ValueError, "experts"),
    (dict(values=torch.randn(5, 3), indices=torch.randint(0, 10, (5, 3))), ValueError, "values"),
    (dict(bias=torch.randn(4)), ValueError, "bias"), (dict(z=torch.randn(4, 7, dtype=f64)), TypeError, "decoder"),
    (dict(indices=torch.full((4, 3), 10)), IndexError, "indices"),
    (dict(experts=torch.randn(0, 5), z=torch.randn(0, 7), values=torch.randn(0, 3),
          indices=torch.zeros(0, 3, dtype=torch.int64)), ValueError, "experts must have at least one row"),
    (dict(experts=torch.randn(10, 5, dtype=torch.float16)), TypeError, "experts has dtype torch.float16 but z"),
]


@pytest.mark.parametrize("over,error,name", GATE_CASES)
def test_topk_gate_errors(over, error, name):
    with pytest.raises(error, match=name):
        mxd_fast.topk_gate(**gate_args(**over))
    args = gate_args(**over)
    if isinstance(args["x"], torch.Tensor) and isinstance(args["k"], int) and not isinstance(args["k"], bool):
        with pytest.raises(error, match=name):     # the registered op checks as much as its schema lets through
            torch.ops.mxd_fast.topk_gate(*args.values())


@pytest.mark.parametrize("over,error,name", GC_CASES)
def test_gather_combine_errors(over, error, name):
    with pytest.raises(error, match=name):
        mxd_fast.gather_combine(**gc_args(**over))
    with pytest.raises(error, match=name):
        torch.ops.mxd_fast.gather_combine(*gc_args(**over).values())


@pytest.mark.parametrize("over,error,name", DECODE_CASES)
def test_mxd_decode_errors(over, error, name):
    with pytest.raises(error, match=name):
        mxd_fast.mxd_decode(**decode_args(**over))
    with pytest.raises(error, match=name):
        torch.ops.mxd_fast.mxd_decode(*decode_args(**over).values())


def test_integer_like_k_is_accepted():
    """numpy integers (e.g. read from a config) work as k; the result is the int's."""
    import numpy as np

    args = gate_args()
    want = mxd_fast.topk_gate(**args)
    got = mxd_fast.topk_gate(**{**args, "k": np.int64(3)})
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    layer = mxd_fast.MxD(np.int32(6), np.int64(5), 4, np.int64(10), np.int64(3))
    assert layer.k == 3 and type(layer.k) is int and layer(torch.randn(2, 6)).shape == (2, 4)
    transcoder = mxd_fast.TopKTranscoder(np.int64(6), np.int32(10), 4, np.int64(3))
    assert type(transcoder.k) is int and transcoder(torch.randn(2, 6)).shape == (2, 4)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, deferred initialisation) go through the ops' fake kernels."""
    meta = dict(device="meta")
    values, indices = mxd_fast.topk_gate(torch.empty(2, 5, 6, **meta), torch.empty(10, 6, **meta), None, 3)
    assert values.shape == indices.shape == (2, 5, 3) and values.is_meta and indices.dtype == torch.int64
    y = mxd_fast.gather_combine(torch.empty(10, 4, **meta), values, indices)
    assert y.shape == (2, 5, 4) and y.is_meta
    layer = mxd_fast.MxD(6, 5, 4, 10, 3, device="meta")
    y = layer(torch.empty(7, 6, **meta))
    assert y.shape == (7, 4) and y.is_meta


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        with mxd_fast.use_backend("fastest"):
            pass


def test_environment_backend(monkeypatch):
    monkeypatch.setenv("MXD_FAST_BACKEND", "torch")
    assert mxd_fast.get_backend() == "torch"
    monkeypatch.setenv("MXD_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MXD_FAST_BACKEND"):
        mxd_fast.topk_gate(**gate_args())


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with mxd_fast.use_backend("triton"):
        with pytest.raises(mxd_fast.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            mxd_fast.topk_gate(**gate_args())
    with mxd_fast.use_backend("cuda"):
        with pytest.raises(mxd_fast.BackendUnavailableError, match="CUDA"):
            mxd_fast.gather_combine(**gc_args())


def test_auto_is_torch_on_cpu():
    from mxd_fast.ops._table import resolve
    with mxd_fast.use_backend("auto"):
        assert resolve("topk_gate", torch.device("cpu")) == "torch"


def test_poison_outputs_reaches_the_extension_environment(monkeypatch):
    """The CUDA bindings read MXD_FAST_POISON; poison_outputs() sets it for its block only."""

    from mxd_fast._utils import new_empty, poison_outputs

    monkeypatch.delenv("MXD_FAST_POISON", raising=False)
    with poison_outputs():
        assert os.environ["MXD_FAST_POISON"] == "1"
        assert torch.isnan(new_empty((3,), torch.float32, torch.device("cpu"))).all()
    assert "MXD_FAST_POISON" not in os.environ


@pytest.mark.parametrize("call,name", [
    (lambda: mxd_fast.topk_gate(**gate_args(x=torch.randn(4, 6).to_sparse())), "x"),
    (lambda: mxd_fast.topk_gate(**gate_args(weight=torch.randn(10, 6).to_sparse())), "weight"),
    (lambda: mxd_fast.gather_combine(**gc_args(values=torch.randn(4, 3).to_sparse())), "values"),
    (lambda: mxd_fast.mxd_decode(**decode_args(experts=torch.randn(10, 5).to_sparse())), "experts"),
])
def test_sparse_tensors_are_refused_by_name(call, name):
    with pytest.raises(TypeError, match=f"{name} must be a dense \\(strided\\) tensor"):
        call()


@pytest.mark.parametrize("value,flag", [
    ("1", True), ("0", False), ("true", True), ("False", False), (" yes ", True), ("no", False), ("ON", True),
    ("off", False), ("", None), ("  ", None),
])
@pytest.mark.parametrize("variable,read,default", [
    pytest.param("MXD_FAST_DETERMINISTIC", lambda: mxd_fast.backend.deterministic(), True, id="deterministic"),
    pytest.param("MXD_FAST_POISON", lambda: mxd_fast._utils.poisoning(), False, id="poison"),
    pytest.param("MXD_FAST_AUTOTUNE", lambda: _autotune_enabled(), True, id="autotune"),
])
def test_boolean_environment_variables(monkeypatch, variable, read, default, value, flag):
    monkeypatch.setenv(variable, value)
    assert read() is (default if flag is None else flag)
    if variable == "MXD_FAST_POISON":   # rewritten as the CUDA bindings read it
        assert os.environ[variable] == ("1" if flag else "0")


def _autotune_enabled():
    pytest.importorskip("triton")
    from mxd_fast.kernels._device import autotune_enabled
    return autotune_enabled()


@pytest.mark.parametrize("value", ["2", "maybe", "y", "enabled", "1.0"])
@pytest.mark.parametrize("variable,read", [
    pytest.param("MXD_FAST_DETERMINISTIC", lambda: mxd_fast.backend.deterministic(), id="deterministic"),
    pytest.param("MXD_FAST_POISON", lambda: mxd_fast._utils.new_empty((2,), f32, torch.device("cpu")), id="poison"),
    pytest.param("MXD_FAST_AUTOTUNE", lambda: _autotune_enabled(), id="autotune"),
])
def test_bad_boolean_environment_variables_are_refused(monkeypatch, variable, read, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"{variable} must be one of 1/0, true/false, yes/no, on/off"):
        read()


def _error(call):
    with pytest.raises((TypeError, ValueError, IndexError)) as info:
        call()
    return type(info.value), str(info.value)


AUTOCAST_CASES = [
    lambda: mxd_fast.topk_gate(**gate_args(k=2.0)),
    lambda: mxd_fast.topk_gate(**gate_args(k=True)),
    lambda: mxd_fast.topk_gate(**gate_args(weight=torch.randn(10, 6, device="meta"))),
    lambda: torch.ops.mxd_fast.topk_gate(*gate_args(weight=torch.randn(10, 6, device="meta")).values()),
    lambda: mxd_fast.topk_gate(**gate_args(bias=torch.randn(10, 1))),
    lambda: mxd_fast.gather_combine(**gc_args(indices=torch.randint(0, 10, (4, 3)).float())),
    lambda: torch.ops.mxd_fast.gather_combine(*gc_args(indices=torch.randint(0, 10, (4, 3)).float()).values()),
    lambda: mxd_fast.gather_combine(**gc_args(values=torch.randn(4, 3, device="meta"))),
    lambda: mxd_fast.mxd_decode(**decode_args(indices=torch.randint(0, 10, (4, 3)).double())),
    lambda: torch.ops.mxd_fast.mxd_decode(*decode_args(experts=torch.randn(10, 5, device="meta")).values()),
    lambda: mxd_fast.mxd_decode(**decode_args(bias=torch.randn(5, device="meta"))),
]


@pytest.mark.parametrize("call", AUTOCAST_CASES)
def test_errors_under_autocast_describe_the_callers_arguments(call):
    """Under torch.autocast the checks run before the cast: the same error as outside it."""
    outside = _error(call)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _error(call) == outside


def test_mixed_floating_dtypes_are_accepted_under_autocast():
    """fp32, fp16 and bf16 mix (they are cast); float64, which autocast leaves alone, must match."""
    f16 = torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        args = gate_args(weight=torch.randn(10, 6, dtype=f16), bias=torch.randn(10, dtype=torch.bfloat16))
        assert mxd_fast.topk_gate(**args)[0].dtype == torch.bfloat16
        assert torch.ops.mxd_fast.topk_gate(*args.values())[0].dtype == torch.bfloat16
        y = mxd_fast.mxd_decode(**decode_args(decoder=torch.randn(7, 5, dtype=f16), values=torch.rand(4, 3, dtype=f16)))
        assert y.dtype == torch.bfloat16
        for call in (lambda: mxd_fast.topk_gate(**gate_args(weight=torch.randn(10, 6, dtype=f64))),
                     lambda: torch.ops.mxd_fast.gather_combine(*gc_args(values=torch.randn(4, 3, dtype=f64)).values())):
            with pytest.raises(TypeError, match="float64 but .*float32; autocast leaves float64"):
                call()
