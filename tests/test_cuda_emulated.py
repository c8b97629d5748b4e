"""The CUDA backend's kernels and launchers (csrc/cuda/) run on the CPU by a warp emulator
(tests/cuda_emulation/), so that a machine without a GPU checks their logic against exact
references: the top-k gate's tile kernel (every dtype, its 16-byte and scalar read paths, several
tiles with the running state between them, k = 1, k = N, ties, NaN, negative logits), the gather,
the gathered dot products, the reverse index and the row reductions over it, and the decode's gather
epilogues (vector and scalar paths, strided rows, the relu mask, out-of-range indices), with
outputs poisoned before every launch. The emulator runs every CUDA thread as a fiber and each warp
collective as a barrier; it checks logic, not timing or the memory model. Needs a C++20 compiler
and the CUDA toolkit's headers (no GPU, no nvcc run)."""
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
DTYPE_IDS = lambda d: str(d).removeprefix("torch.")  # noqa: E731


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
    return build_emulated(tmp_path_factory.mktemp("cuda_emulation"), KERNEL_DIR, include, cxx)


def build_emulated(out: Path, kernel_dir: Path, include: Path, cxx: str) -> ctypes.CDLL:
    """Compiles the harnesses against rewritten copies of kernel_dir's sources into out; loads them."""
    for path in kernel_dir.iterdir():
        if path.suffix in (".cu", ".cuh", ".h"):
            text = emulated_source(path.read_text())
            assert "<<<" not in text, f"{path.name}: a launch the rewrite missed"
            (out / path.name).write_text(text)
    library = out / "libmxd_emulated.so"
    harnesses = sorted(str(p) for p in EMULATION_DIR.glob("*_harness.cpp"))
    # -U_FORTIFY_SOURCE: the fibers' _longjmp between stacks must not go through glibc's fortified check.
    cmd = [cxx, "-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-shared", "-fPIC", "-w", f"-I{out}", f"-I{EMULATION_DIR}",
           f"-I{include}", *harnesses, "-o", str(library)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-6000:]
    lib = ctypes.CDLL(str(library))
    lib.emu_topk_state_bytes_per_row.restype = ctypes.c_size_t
    lib.emu_topk_state_bytes_per_row.argtypes = [ctypes.c_int, ctypes.c_int]
    return lib


# Argument kinds of the harnesses' entry points: i int, q int64, p pointer (a tensor, or None).
_SIGNATURES = {
    "emu_topk_gate_tile": "ipqqqqipiipp",
    "emu_gather_combine": "ipqqpppqqqpq",
    "emu_gathered_dot": "ipqqpppqqqpqpqp",
    "emu_reverse_index": "pqqpp",
    "emu_scatter_rows": "ipppppqqqpqpqqp",
    "emu_scatter_sum": "ipppppqqqp",
    "emu_mxd_decode_combine": "ipqqpppqqqpqp",
    "emu_mxd_decode_grad_h": "ipqqpppqqqpqpq",
}
_KINDS = {"i": ctypes.c_int, "q": ctypes.c_int64, "p": ctypes.c_void_p}


def call(lib, name: str, *args) -> None:
    """Runs an entry point; fails the test on an emulator error or a launch status other than success."""
    fn = getattr(lib, name)
    fn.restype = ctypes.c_int
    fn.argtypes = [_KINDS[k] for k in _SIGNATURES[name]] + [ctypes.c_char_p, ctypes.c_int]
    converted = [None if a is None else a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    error = ctypes.create_string_buffer(512)
    status = fn(*converted, error, len(error))
    assert error.value == b"", error.value.decode()
    assert status == 0, f"{name} returned cudaError_t {status}"


def test_the_rewrite_reaches_every_launch():
    for path in KERNEL_DIR.glob("*.cu*"):
        text = emulated_source(path.read_text())
        assert "<<<" not in text and "__shared__" not in text, path.name
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
    for n0 in range(0, n, tile_cols):
        cols = min(tile_cols, n - n0)
        ld = -(-cols // 8) * 8 + (0 if aligned else 1)
        flat = torch.full((rows * ld + 1,), math.inf, dtype=dtype)
        buf = (flat[:-1] if aligned else flat[1:]).view(rows, ld)
        buf[:, :cols] = logits[:, n0:n0 + cols]
        call(lib, "emu_topk_gate_tile", code, buf, rows, cols, ld, n0, k, state, int(n0 == 0), int(n0 + cols >= n),
             values, indices)
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


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS)
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


@pytest.mark.parametrize("dtype,k,n", [(torch.float64, 200, 700), (torch.float32, 1024, 1100),
                                       (torch.float64, 1024, 1030)], ids=["200-of-700", "1024-of-1100", "1024-of-1030"])
def test_topk_gate_tile_large_k(emulated, dtype, k, n):
    """k up to the in-kernel limit (1024), not always a power of two: padding slots, one or two warps
    per block where shared memory allows no more."""
    logits = _logits(3, n, dtype, seed=k, levels=4)
    values, indices = _gate_tiles(emulated, logits, k, 512, aligned=True)
    _check_gate(logits, k, values, indices)


# ---- gather_combine.cu and mxd_decode.cu ---------------------------------------------------

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
B, K, N = 13, 37, 29  # K above a warp: the entries are read 32 at a time


def _selection(dtype, seed=0, masked=True):
    """values, relu mask (or None, NaN in two places) and indices [B, K], with indices out of range
    (-1, N + 3) mixed in."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype)
    mask = torch.randn(B, K, generator=g, dtype=torch.float64).to(dtype) if masked else None
    if masked:
        mask[2, 5] = mask[7, 33] = float("nan")     # relu's gradient passes at NaN
    indices = torch.randint(0, N, (B, K), generator=g)
    indices[0, 3], indices[5, 36], indices[12, 0] = -1, N + 3, N
    return values, mask, indices


def _coefficients(values, mask, indices):
    """The float64 coefficient of each entry: 0 where the mask is <= 0 (NaN passes) or the index is out of range."""
    coef = values.double().clone()
    if mask is not None:
        coef[mask.double() <= 0] = 0
    coef[(indices < 0) | (indices >= N)] = 0
    return coef


def _rows(n, d, dtype, seed, stride=None):
    """[n, d] of dtype with row stride `stride` (a view into a wider buffer when stride > d)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, stride or d, generator=g, dtype=torch.float64).to(dtype)
    return full[:, :d]


def _gathered(table, indices, coef):
    safe = indices.clamp(0, N - 1)
    return torch.einsum("bk,bkd->bd", coef, table.double()[safe])


def _poisoned(*shape, dtype, stride=None):
    full = torch.full((shape[0], stride or shape[1]), math.nan, dtype=dtype)
    return full[:, :shape[1]]


# vector; scalar (D % 8 != 0); vector with strided rows; vector with the columns split over warps
PATHS = [(40, None), (37, None), (40, 56), (520, None)]
PATH_IDS = ["vector", "scalar", "strided", "wide"]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
@pytest.mark.parametrize("D,stride", PATHS, ids=PATH_IDS)
def test_gather_combine(emulated, dtype, D, stride):
    values, mask, indices = _selection(dtype, seed=1)
    table = _rows(N, D, dtype, seed=2, stride=stride)
    out = _poisoned(B, D, dtype=dtype, stride=stride)
    call(emulated, "emu_gather_combine", DTYPES[dtype], table, table.stride(0), D, values, mask, indices, B, K, N,
         out, out.stride(0))
    torch.testing.assert_close(out.double(), _gathered(table, indices, _coefficients(values, mask, indices)),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
@pytest.mark.parametrize("D,stride", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_gathered_dot(emulated, dtype, D, stride, scaled):
    values, mask, indices = _selection(dtype, seed=3)
    table = _rows(N, D, dtype, seed=4, stride=stride)
    dense = _rows(B, D, dtype, seed=5, stride=stride)
    scale = _rows(B, D, dtype, seed=6, stride=stride) if scaled else None
    out = torch.full((B, K), math.nan, dtype=dtype)
    call(emulated, "emu_gathered_dot", DTYPES[dtype], table, table.stride(0), D, values, mask, indices, B, K, N,
         dense, dense.stride(0), scale, 0 if scale is None else scale.stride(0), out)
    rows = dense.double() * (scale.double() if scaled else 1)
    want = torch.einsum("bd,bkd->bk", rows, table.double()[indices.clamp(0, N - 1)])
    want[(indices < 0) | (indices >= N)] = 0
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def _reverse_index(lib, indices):
    total = indices.numel()
    row_ptr = torch.full((N + 1,), -5, dtype=torch.int32)
    entries = torch.full((total,), -5, dtype=torch.int32)
    call(lib, "emu_reverse_index", indices, total, N, row_ptr, entries)
    return row_ptr, entries


def test_reverse_index(emulated):
    _, _, indices = _selection(torch.float32, seed=7)
    row_ptr, entries = _reverse_index(emulated, indices)
    flat = indices.flatten().tolist()
    key = [i if 0 <= i < N else N for i in flat]
    assert entries.tolist() == sorted(range(len(flat)), key=lambda p: key[p])  # stable: increasing p per row
    assert row_ptr.tolist() == [sum(1 for k in key if k < n) for n in range(N + 1)]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
@pytest.mark.parametrize("D,stride", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_scatter_rows_and_sum(emulated, dtype, D, stride, scaled):
    values, mask, indices = _selection(dtype, seed=8)
    values[2, :] = values[2, 0]  # a hot expert: many entries in one row
    indices[2, :] = 4
    row_ptr, entries = _reverse_index(emulated, indices)
    dense = _rows(B, D, dtype, seed=9, stride=stride)
    scale = _rows(B, D, dtype, seed=10, stride=stride) if scaled else None
    out = torch.full((N, D), math.nan, dtype=dtype)
    call(emulated, "emu_scatter_rows", DTYPES[dtype], row_ptr, entries, values, mask, indices, B, K, N, dense,
         dense.stride(0), scale, 0 if scale is None else scale.stride(0), D, out)
    coef = _coefficients(values, mask, indices)
    rows = dense.double() * (scale.double() if scaled else 1)
    onehot = torch.nn.functional.one_hot(indices.clamp(0, N - 1), N).double() * coef[..., None]  # [B, K, N]
    torch.testing.assert_close(out.double(), torch.einsum("bkn,bd->nd", onehot, rows), **TOL[dtype])
    sums = torch.full((N,), math.nan, dtype=dtype)
    call(emulated, "emu_scatter_sum", DTYPES[dtype], row_ptr, entries, values, mask, indices, B, K, N, sums)
    torch.testing.assert_close(sums.double(), onehot.sum((0, 1)), **TOL[dtype])


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPE_IDS)
@pytest.mark.parametrize("D,stride", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_mxd_decode_epilogues(emulated, dtype, D, stride, with_bias):
    values, _, indices = _selection(dtype, seed=11, masked=False)
    experts = _rows(N, D, dtype, seed=12, stride=stride)
    h = _rows(B, D, dtype, seed=13, stride=stride)
    bias = _rows(1, D, dtype, seed=14)[0] if with_bias else None
    mixture = _gathered(experts, indices, _coefficients(values, None, indices))
    y = h.clone() if stride is None else _poisoned(B, D, dtype=dtype, stride=stride)
    y.copy_(h)  # y holds h = z @ decoder on entry
    call(emulated, "emu_mxd_decode_combine", DTYPES[dtype], experts, experts.stride(0), D, values, None, indices,
         B, K, N, y, y.stride(0), bias)
    want = h.double() * mixture + (bias.double() if with_bias else 0)
    torch.testing.assert_close(y.double(), want, **TOL[dtype])

    grad_y = _rows(B, D, dtype, seed=15, stride=stride)
    grad_h = _poisoned(B, D, dtype=dtype, stride=stride)
    call(emulated, "emu_mxd_decode_grad_h", DTYPES[dtype], experts, experts.stride(0), D, values, None, indices,
         B, K, N, grad_y, grad_y.stride(0), grad_h, grad_h.stride(0))
    torch.testing.assert_close(grad_h.double(), grad_y.double() * mixture, **TOL[dtype])


def test_empty_selection_writes_nothing(emulated):
    out = torch.full((2, 8), 3.0)
    empty = torch.empty(0, K, dtype=torch.int64)
    call(emulated, "emu_gather_combine", DTYPES[torch.float32], torch.zeros(N, 8), 8, 8, torch.empty(0, K), None,
         empty, 0, K, N, out, 8)
    assert (out == 3.0).all()


# ---- the emulator itself -------------------------------------------------------------------


def _selftest(lib, which, blocks, threads):
    fn = lib.emu_selftest
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                   ctypes.c_int]
    n = blocks * threads
    inp = torch.randint(-50, 50, (n,), dtype=torch.int32)
    out = torch.full((n,), -1, dtype=torch.int32)
    error = ctypes.create_string_buffer(512)
    status = fn(which, inp.data_ptr(), out.data_ptr(), blocks, threads, error, len(error))
    return inp, out, status, error.value.decode()


def test_emulator_runs_warp_collectives(emulated):
    inp, out, status, error = _selftest(emulated, 0, blocks=3, threads=64)
    assert status == 0 and error == ""
    warps = inp.view(-1, 32)
    want = warps.sum(1, keepdim=True) + 1000 * (warps % 2 != 0).sum(1, keepdim=True)
    lane31 = torch.tensor([31, 63] * 3, dtype=torch.int32)[:, None]  # threadIdx.x of each warp's lane 31
    assert torch.equal(out.view(-1, 32), (want + 100000 * lane31).expand(-1, 32).int())


@pytest.mark.parametrize("which,message", [(1, "some of whose threads exited"), (2, "deadlock")])
def test_emulator_reports_broken_synchronisation(emulated, which, message):
    _, _, status, error = _selftest(emulated, which, blocks=1, threads=64)
    assert status != 0 and message in error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=DTYPE_IDS)
@pytest.mark.parametrize("aligned", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("k", [1, 3])
def test_topk_gate_tile_candidates_of_one_vote(emulated, dtype, aligned, k):
    """A later tile with a few candidates that one vote finds together (lanes 0-3, same load and
    element), largest first: after each insertion the rest must be checked against the risen threshold."""
    rows, tile = 4, 64
    logits = torch.rand(rows, 2 * tile, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    logits[:, tile:] = -1.0
    vec = 16 // logits.to(dtype).element_size() if aligned else 1
    for lane, value in enumerate((9.0, 8.0, 7.0, 6.0)):
        logits[:, tile + lane * vec] = value
    logits = logits.to(dtype)
    values, indices = _gate_tiles(emulated, logits, k, tile, aligned)
    _check_gate(logits, k, values, indices)
