"""python -m mxd_fast.inspect: a self-contained HTML report of a trained MxD layer or TopK transcoder; see
mxd_fast.train.report and docs/inspect.md."""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence

INSTALL = "pip install 'mxd_fast[train]'"
# import name -> package name, for what the report needs beyond torch
REQUIRED = {"transformers": "transformers", "safetensors": "safetensors", "gguf": "gguf"}


def missing_packages() -> list:
    return [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the report is written; 1 (one line on stderr) when a package is missing; 2 on bad input, with a
    one-line error naming the argument."""
    missing = missing_packages()
    if missing:
        print(f"python -m mxd_fast.inspect needs {', '.join(missing)}, not installed: {INSTALL}", file=sys.stderr)
        return 1
    from mxd_fast.train.report import run

    try:
        run(argv)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"python -m mxd_fast.inspect: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
