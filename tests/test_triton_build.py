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
