"""The CUDA backend's kernels and launchers (csrc/cuda/) run on the CPU by a warp emulator
(tests/cuda_emulation/warp_emulator.h), so that a machine without a GPU checks their logic: the
top-k gate's tile kernel against an exact reference over every dtype, its 16-byte and scalar read
paths, several tiles with the running state between them, k = 1, k = N, ties, NaN and negative
logits, outputs poisoned before the launch. The emulator runs every CUDA thread as a fiber and each
warp collective as a barrier; it checks logic, not timing or the memory model. Needs a C++20
compiler and the CUDA toolkit's headers (no GPU, no nvcc run)."""
from __future__ import annotations

import ctypes
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "csrc" / "cuda"
EMULATION_DIR = Path(__file__).resolve().parent / "cuda_emulation"

_LAUNCH = re.compile(r"(\w+(?:<[^<>;{}]*>)?)<<<(.*?)>>>\(", re.S)
_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(.+?)\s+(\w+)\[\];")

# mxd::DType
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def emulated_source(text: str) -> str:
    """A kernel source with its launches and dynamic shared memory rewritten for the emulator."""
    text = _LAUNCH.sub(r"::emu::Launcher(\2)(\1, ", text)
    return _SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::emu::dynamic_shared());", text)


def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.insert(0, str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime.h").is_file():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    include = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if include is None or cxx is None:
        pytest.skip("needs the CUDA toolkit's headers and a C++ compiler")
    out = tmp_path_factory.mktemp("cuda_emulation")
    for path in KERNEL_DIR.iterdir():
        if path.suffix in (".cu", ".cuh", ".h"):
            text = emulated_source(path.read_text())
            assert "<<<" not in text, f"{path.name}: a launch the rewrite missed"
            (out / path.name).write_text(text)
    library = out / "libmxd_emulated.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", f"-I{out}", f"-I{EMULATION_DIR}", f"-I{include}",
           str(EMULATION_DIR / "topk_gate_harness.cpp"), "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    lib = ctypes.CDLL(str(library))
    lib.emu_topk_state_bytes_per_row.restype = ctypes.c_size_t
    lib.emu_topk_state_bytes_per_row.argtypes = [ctypes.c_int, ctypes.c_int]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.emu_topk_gate_tile.restype = ctypes.c_int
    lib.emu_topk_gate_tile.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, ctypes.c_int, ptr, ctypes.c_int,
                                       ctypes.c_int, ptr, ptr, ctypes.c_char_p, ctypes.c_int]
    return lib


def test_the_rewrite_reaches_every_launch():
    for path in KERNEL_DIR.glob("*.cu*"):
        text = emulated_source(path.read_text())
        assert "<<<" not in text and "__shared__ " not in text.replace("// ", ""), path.name
    assert "::emu::Launcher(grid, warps * kWarp, smem, stream)(topk_tile_kernel<T, decltype(vec)::value>, " in \
        emulated_source((KERNEL_DIR / "topk_gate.cu").read_text())


# ---- topk_gate_tile --------------------------------------------------------------------------


def _ranked(row: list[float], k: int) -> list[int]:
    """Indices of the k largest relu'd logits: NaN first, then larger values, ties to the smaller index."""
    def rank(i):
        v = row[i]
        return (1, 0.0, -i) if math.isnan(v) else (0, max(v, 0.0), -i)
    return sorted(range(len(row)), key=rank, reverse=True)[:k]


def _gate_tiles(lib, logits: torch.Tensor, k: int, tile_cols: int, aligned: bool):
    """Runs topk_gate_tile over logits [rows, N] in tiles of tile_cols experts, each tile in its
    own buffer: 16-byte aligned rows, or rows shifted off alignment (the scalar path). Columns
    past a tile's width hold +inf, which must not be read."""
    rows, n = logits.shape
    dtype = logits.dtype
    code = DTYPES[dtype]
    state = torch.randint(0, 256, (max(1, rows * lib.emu_topk_state_bytes_per_row(code, k)),), dtype=torch.uint8)
    values = torch.full((rows, k), -7.0, dtype=dtype)  # poison: never a relu output
    indices = torch.full((rows, k), -99, dtype=torch.int64)
    error = ctypes.create_string_buffer(512)
    for n0 in range(0, n, tile_cols):
        cols = min(tile_cols, n - n0)
        ld = -(-cols // 8) * 8 + (0 if aligned else 1)
        flat = torch.full((rows * ld + 1,), math.inf, dtype=dtype)
        buf = (flat[:-1] if aligned else flat[1:]).view(rows, ld)
        buf[:, :cols] = logits[:, n0:n0 + cols]
        status = lib.emu_topk_gate_tile(code, buf.data_ptr(), rows, cols, ld, n0, k, state.data_ptr(), n0 == 0,
                                        n0 + cols >= n, values.data_ptr(), indices.data_ptr(), error, len(error))
        assert error.value == b"", error.value.decode()
        assert status == 0
    return values, indices


def _check_gate(logits: torch.Tensor, k: int, values: torch.Tensor, indices: torch.Tensor):
    exact = logits.double()
    for r in range(logits.shape[0]):
        want = _ranked(exact[r].tolist(), k)
        assert indices[r].tolist() == want, f"row {r}"
        want_values = exact[r, want].clamp(min=0)  # NaN stays NaN
        assert torch.equal(values[r].double().nan_to_num(nan=-1.0), want_values.nan_to_num(nan=-1.0)), f"row {r}"


def _logits(rows: int, n: int, dtype: torch.dtype, seed: int, levels: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    if levels is not None:  # few distinct values: many ties, many exact zeros after the relu
        x = torch.round(x * levels / 3) / levels
    return x.to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("rows,n,k,tile_cols", [
    (11, 300, 7, 300),      # one tile, rows not a multiple of the block's warps
    (9, 1100, 40, 256),     # several tiles, the running state between them, k above a warp
    (5, 70, 70, 32),        # k = N, tiles narrower than k
    (6, 45, 1, 45),         # k = 1
])
def test_topk_gate_tile_matches_the_exact_ranking(emulated, dtype, aligned, rows, n, k, tile_cols):
    logits = _logits(rows, n, dtype, seed=rows * n + k)
    values, indices = _gate_tiles(emulated, logits, k, tile_cols, aligned)
    _check_gate(logits, k, values, indices)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
def test_topk_gate_tile_ties_nan_and_zeros(emulated, dtype, aligned):
    """Few distinct values (ties everywhere, half the row relu'd to zero), NaN and +inf; a row of all
    negative logits (only zeros to choose from) and a row of equal values: the earlier experts win."""
    logits = _logits(8, 600, dtype, seed=3, levels=2)
    logits[0, [5, 370]] = math.nan
    logits[1, 17] = math.inf
    logits[1, 400] = math.nan
    logits[2] = -1.0
    logits[3] = 0.5
    logits[4, ::7] = -0.0
    for k, tile_cols in ((24, 128), (100, 600), (600, 200)):
        values, indices = _gate_tiles(emulated, logits, k, tile_cols, aligned)
        _check_gate(logits, k, values, indices)
    assert indices[2, :5].tolist() == [0, 1, 2, 3, 4]


def test_topk_gate_tile_largest_k_with_padding_slots(emulated):
    """k not a power of two near the in-kernel limit's scale (kpad = 256 slots, 1 warp per block
    where shared memory allows fewer)."""
    logits = _logits(3, 700, torch.float64, seed=5, levels=4)
    values, indices = _gate_tiles(emulated, logits, 200, 512, aligned=True)
    _check_gate(logits, 200, values, indices)
