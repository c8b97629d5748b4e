"""mxd_fast.reuse_freed_memory: after it, a training step's large gradients (two [40000, 256] fp32 tensors,
41 MB each, above glibc's default mmap threshold) reuse the memory the previous step freed instead of
faulting fresh pages in. Each case runs in a fresh interpreter, since the setting is process-wide."""
from __future__ import annotations

import subprocess
import sys

import pytest

import mxd_fast.cpu_memory as M

SCRIPT = """
import resource, sys, torch
import mxd_fast
applied = mxd_fast.reuse_freed_memory() if sys.argv[1] == "reuse" else None
torch.manual_seed(0)
layer = mxd_fast.MxD(256, 64, 256, 40000, 4, activation="relu")
x = torch.randn(64, 256)
def step():
    layer.zero_grad(set_to_none=True)
    layer(x).square().mean().backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _faults_per_step(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(M._libc() is None, reason="glibc only")
def test_a_training_step_reuses_the_memory_the_last_one_freed():
    applied, faults = _faults_per_step("reuse")
    _, faults_default = _faults_per_step("default")
    assert applied == "True"
    assert faults_default > 15000                 # the two 41 MB gradients' 4 KiB pages, every step
    assert faults < faults_default / 4


def test_elsewhere_it_changes_nothing(monkeypatch):
    monkeypatch.setattr(M, "_libc", lambda: None)
    assert M.reuse_freed_memory() is False
