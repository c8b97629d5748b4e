"""python -m mxd_fast.probe: sparse probing of a trained MxD layer (and a TopK transcoder, the model's MLP
neurons and its residual stream) on offline data sets; see mxd_fast.train.probe and docs/probing.md."""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

INSTALL = "pip install 'mxd_fast[train]'"
# import name -> package name, for what the probe needs beyond torch
REQUIRED = {"sklearn": "scikit-learn", "transformers": "transformers", "matplotlib": "matplotlib",
            "safetensors": "safetensors", "gguf": "gguf"}


def missing_packages() -> list:
    return [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the report is written; 1 (one line on stderr) when a package is missing; 2 on bad input,
    with a one-line error naming the option."""
    missing = missing_packages()
    if missing:
        print(f"python -m mxd_fast.probe needs {', '.join(missing)}, not installed: {INSTALL}", file=sys.stderr)
        return 1
    from mxd_fast.train.probe import run

    try:
        run(argv)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"python -m mxd_fast.probe: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
