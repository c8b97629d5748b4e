"""Build checks of the CUDA backend (csrc/) that need no GPU: the kernels compile with nvcc for
sm_80 and sm_90a without register spills, the torch bindings pass a syntax check against torch's
headers, the kernels stay free of torch headers, and the registered schemas match the kernel
contract of the other backends. The functional tests of the CUDA backend are the per-backend op
tests (the `cuda` parameter of the `backend` fixture) and tests/test_cuda_ops.py, on a GPU."""
from __future__ import annotations

import importlib.util
import inspect
import re
import shutil
import sys
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _load_checker():
    spec = importlib.util.spec_from_file_location("mxd_fast_check_build", CSRC / "check_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check = _load_checker()

needs_nvcc = pytest.mark.skipif(check.find_nvcc() is None,
                                reason="nvcc not found on PATH or in CUDA_HOME: the CUDA kernels cannot be compiled")

OPS = ("topk_gate", "gather_combine", "mxd_decode")


def test_one_kernel_file_per_op():
    for op in OPS:
        assert (CSRC / "cuda" / f"{op}.cu").is_file(), op
        assert (CSRC / f"{op}.cpp").is_file(), op


def test_kernels_are_free_of_torch_headers():
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10|pybind11|Python)')
    for path in sorted((CSRC / "cuda").iterdir()):
        if path.suffix in (".cu", ".cuh", ".h"):
            assert not pattern.search(path.read_text()), f"{path.name} includes a torch header"


def _schemas() -> dict[str, list[str]]:
    """op name -> argument names, from the TORCH_LIBRARY block of registration.cpp."""
    text = (CSRC / "registration.cpp").read_text()
    text = re.sub(r'"\s*\n\s*"', "", text)  # join adjacent string literals
    schemas = {}
    for name, args in re.findall(r'm\.def\(\s*"(\w+)\(([^)]*)\)', text):
        schemas[name] = [a.split()[-1] for a in args.split(",")]
    return schemas


def test_schemas_match_the_kernel_contract():
    """registration.cpp states the kernel contract once: every op/direction the backend table (ops/_table.py)
    names for CUDA is defined there, with the argument names of the table's torch and Triton functions,
    and implemented for CUDA in the op's binding."""
    from mxd_fast.ops import _table

    schemas = _schemas()
    assert set(schemas) == {f"{op}_{d}" for op in OPS for d in ("forward", "backward")}
    triton_ok = importlib.util.find_spec("triton") is not None
    for op in OPS:
        binding = (CSRC / f"{op}.cpp").read_text()
        entries = _table.TABLE[op]
        for direction in ("forward", "backward"):
            name = getattr(entries["cuda"], direction).name
            assert name in schemas, f"{op} {direction}: {name} is not defined in registration.cpp"
            backends = ("torch", "triton") if triton_ok else ("torch",)
            for backend in backends:
                function = entries[backend].function(direction)
                assert list(inspect.signature(function).parameters) == schemas[name], f"{backend} {name}"
            assert re.search(rf'm\.impl\("{name}"', binding), f"{name} has no CUDA impl"


def test_registered_schemas_are_the_source():
    """Where the extension is built, the schemas the ops run with are the registered ones: read back from
    torch.ops.mxd_fast_cuda, they are registration.cpp's."""
    import torch

    from mxd_fast import _extension
    from mxd_fast.ops import _table

    if not _extension.cuda_ops_loaded():
        pytest.skip(f"the CUDA extension is not built: {_extension.cuda_load_error()}")
    schemas = _schemas()
    for op in OPS:
        for direction in ("forward", "backward"):
            cuda_op = _table.TABLE[op]["cuda"].function(direction)
            registered = [a.name for a in cuda_op.default._schema.arguments]
            assert registered == schemas[getattr(_table.TABLE[op]["cuda"], direction).name], (op, direction)
            assert cuda_op is getattr(torch.ops.mxd_fast_cuda, f"{op}_{direction}")


@needs_nvcc
def test_kernels_compile_without_register_spills():
    results = check.compile_kernels()
    print(check.format_report(results))
    failed = [f"{r.source} ({r.arch}):\n{r.log}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    spills = [f"{k.source} {k.arch} {k.name}: {k.spill_stores} B spill stores, {k.spill_loads} B spill loads, "
              f"{k.stack} B stack" for r in results for k in r.kernels if k.spills]
    assert not spills, "\n".join(spills)
    names = {(k.arch, k.name.split("<")[0]) for r in results for k in r.kernels}
    for arch in check.DEFAULT_ARCHS:
        for kernel in ("topk_tile_kernel", "gather_kernel", "gathered_dot_kernel", "scatter_rows_kernel",
                       "scatter_sum_kernel"):
            assert (arch, kernel) in names, f"{kernel} missing for {arch}"


def _binding_check_reason() -> str | None:
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "no host C++ compiler"
    nvcc = check.find_nvcc()
    if nvcc is None or check.cuda_include_dir(nvcc) is None:
        return "CUDA toolkit headers not found"
    try:
        includes = check.torch_includes()
    except Exception as e:  # noqa: BLE001
        return f"torch's include paths are unavailable: {e}"
    if not any(Path(p, "c10/cuda/CUDAStream.h").exists() for p in includes):
        return "this torch installation ships no c10/cuda headers"
    return None


@needs_nvcc
def test_bindings_pass_a_syntax_check():
    reason = _binding_check_reason()
    if reason is not None:
        pytest.skip(reason)
    results = check.syntax_check_bindings()
    assert {name for name, _, _ in results} >= {f"{op}.cpp" for op in OPS} | {"registration.cpp"}
    failed = [log for _, ok, log in results if not ok]
    assert not failed, "\n".join(failed)


def test_a_build_older_than_its_sources_is_reported(tmp_path, monkeypatch):
    """setup.py records a digest of csrc/ in mxd_fast/_cuda_build.py; a checkout whose sources changed
    since is reported as stale (by `python -m mxd_fast.info`, and to the GPU script, which rebuilds)."""
    import types

    import mxd_fast
    from mxd_fast import _extension, info

    src = tmp_path / "csrc"
    (src / "cuda").mkdir(parents=True)
    (src / "a.cpp").write_text("int a;")
    (src / "cuda" / "k.cu").write_text("int k;")
    (src / "notes.md").write_text("not a source")
    digest = _extension.csrc_digest(src)
    assert digest == _extension.csrc_digest(src) and len(digest) == 64
    (src / "notes.md").write_text("still not a source")
    assert _extension.csrc_digest(src) == digest
    (src / "cuda" / "k.cu").write_text("int k2;")
    assert _extension.csrc_digest(src) != digest
    assert _extension.csrc_digest(tmp_path / "missing") is None

    current = _extension.csrc_digest(CSRC)
    for recorded, stale in ((current, False), ("0" * 64, True), (None, None)):
        record = types.ModuleType("mxd_fast._cuda_build")
        record.ARCH_LIST = "9.0a"
        if recorded is not None:
            record.SOURCE_SHA256 = recorded
        monkeypatch.setitem(sys.modules, "mxd_fast._cuda_build", record)
        monkeypatch.setattr(mxd_fast, "_cuda_build", record, raising=False)
        assert _extension.cuda_build_is_stale() is stale
        monkeypatch.setattr(_extension, "cuda_ops_loaded", lambda: True)
        assert ("built from older sources" in info.report()) == bool(stale)
