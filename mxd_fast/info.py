"""python -m mxd_fast.info: versions, devices and the backends that can run on each."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from . import __version__, _extension
from .backend import available_backends, get_backend, unavailable_reason


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    lines = [
        f"mxd_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"triton {_version('triton')}",
        f"backend in force: {get_backend()}",
        f"CUDA extension: {'loaded' if _extension.cuda_ops_loaded() else 'absent (' + str(_extension.cuda_load_error()) + ')'}",
    ]
    if _extension.cuda_ops_loaded() and _extension.cuda_build_is_stale():
        lines.append("  built from older sources: csrc/ changed since; rebuild with "
                     "`pip install --no-build-isolation -e .`")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        lines.append(f"{device} ({name}): backends {', '.join(available_backends(device))}")
        for b in ("triton", "cuda"):
            reason = unavailable_reason(b, device)
            if reason is not None:
                lines.append(f"  {b}: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(prog="python -m mxd_fast.info", description=__doc__).parse_args()
    print(report())
