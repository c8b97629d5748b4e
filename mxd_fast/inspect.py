"""python -m mxd_fast.inspect: a self-contained HTML report of a trained MxD layer or TopK transcoder; see
mxd_fast.train.report and docs/inspect.md."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ._entry import run_tool

# import name -> package name, for what the report needs beyond torch
REQUIRED = {"transformers": "transformers", "safetensors": "safetensors", "gguf": "gguf"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the outputs are written; 1 (one line on stderr) when a package is missing; 2 on bad input."""
    return run_tool("python -m mxd_fast.inspect", REQUIRED, "mxd_fast.train.report:run", argv)


if __name__ == "__main__":
    sys.exit(main())
