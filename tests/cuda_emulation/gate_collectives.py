"""Warp collectives (shuffles and votes, each a step of the warp's serial dependency chain) per row
that the CUDA gate's selection kernel takes under the warp emulator, for the current csrc/cuda and,
optionally, the topk_gate.cu of an earlier git revision: a CPU-side comparison of kernel versions.
It counts logic steps, not time (memory round trips, the other cost, are fixed by the read pattern).

python tests/cuda_emulation/gate_collectives.py [--rev REV] [--n 57330] [--rows 8] [--k 32 128]
(defaults: Pythia-1.4B's N in tiles of 2048 experts, as the binding makes them at 4096 tokens, bf16)."""
from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
import test_cuda_emulated as emulation  # noqa: E402


def collectives_per_row(lib, logits: torch.Tensor, k: int, tile: int) -> float:
    """Runs the gate over logits; checks its values (an older kernel may break ties differently)."""
    lib.emu_collective_count.restype = ctypes.c_uint64
    lib.emu_collective_count(1)
    values, _ = emulation._gate_tiles(lib, logits, k, tile, aligned=True)
    count = lib.emu_collective_count(1)
    want = logits.double().relu().topk(k, dim=1).values
    assert torch.equal(values.double(), want), "wrong values"
    return count / logits.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", help="also count the topk_gate.cu of this git revision")
    parser.add_argument("--n", type=int, default=57330)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tile", type=int, default=2048)
    parser.add_argument("--k", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    include = emulation._cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if include is None or cxx is None:
        sys.exit("needs the CUDA toolkit's headers and a C++ compiler")
    work = Path(tempfile.mkdtemp())
    (work / "current").mkdir()
    libs = {"current": emulation.build_emulated(work / "current", emulation.KERNEL_DIR, include, cxx)}
    if args.rev:
        old = work / "old_kernels"
        shutil.copytree(emulation.KERNEL_DIR, old)
        (old / "topk_gate.cu").write_text(subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{args.rev}:csrc/cuda/topk_gate.cu"],
            capture_output=True, text=True, check=True).stdout)
        (work / "old").mkdir()
        libs[args.rev] = emulation.build_emulated(work / "old", old, include, cxx)
    tiles = -(-args.n // args.tile)
    for k in args.k:
        logits = emulation._logits(args.rows, args.n, torch.bfloat16, seed=k)
        for name, lib in libs.items():
            per_row = collectives_per_row(lib, logits, k, args.tile)
            print(f"k = {k:4d}  {name:>10}: {per_row:8.0f} warp collectives per row ({per_row / tiles:.0f} per tile)")


if __name__ == "__main__":
    main()
