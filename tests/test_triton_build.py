"""Build check of the Triton kernels that needs no GPU (kernels/check_build.py): every configuration the
ops launch on a GPU compiles for sm_80 and sm_90 with Triton's compiler and ptxas, without register
spills in the fixed configurations and with at least one autotuning candidate that fits. The interpreter tests check
what the kernels compute; this checks that the GPU compiler accepts them."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="compiles for a GPU: run without TRITON_INTERPRET")


@pytest.mark.parametrize("capability", [80, 90])
def test_every_launched_configuration_compiles(capability):
    from mxd_fast.kernels import check_build

    records = check_build.check(capabilities=(capability,), quick=True)
    assert records, "nothing was compiled"
    kernels = {r.kernel for r in records}
    assert {"_topk_gate_fwd_kernel", "_mxd_decode_kernel"} <= kernels, kernels
    assert check_build.failures(records) == []


# Compile-time arguments an autotuner may leave out of its key: those fixed by the key's own arguments or
# by the interpreter (never on a GPU, where the tuned kernels run).
_DERIVED = {"K_PAD", "FULL_MERGE_AT", "TO_WORKSPACE", "DOT_UPCAST", "DOT_FP32"}


def test_autotune_keys_cover_every_compile_time_argument():
    """A configuration tuned for one setting (fp32 precision, bias or none, ...) must not be reused for
    another: every constexpr a launch sets is in the key unless the configuration sets it."""
    from triton.runtime.autotuner import Autotuner

    from mxd_fast.kernels import mxd_decode, topk_gate

    tuners = [obj for module in (mxd_decode, topk_gate) for obj in vars(module).values() if isinstance(obj, Autotuner)]
    assert len(tuners) == 3, tuners
    for tuner in tuners:
        constexprs = {p.name for p in tuner.fn.params if p.is_constexpr}
        tuned = set().union(*(c.kwargs for c in tuner.configs))
        missing = constexprs - tuned - set(tuner.keys) - _DERIVED
        assert not missing, (tuner.fn.__name__, sorted(missing))
