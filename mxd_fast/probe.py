"""python -m mxd_fast.probe: sparse probing of a trained MxD layer (and a TopK transcoder, the model's MLP
neurons and its residual stream) on offline data sets; see mxd_fast.train.probe and docs/probing.md."""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from ._entry import run_tool

# import name -> package name, for what the probe needs beyond torch
REQUIRED = {"sklearn": "scikit-learn", "transformers": "transformers", "matplotlib": "matplotlib",
            "safetensors": "safetensors", "gguf": "gguf"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the outputs are written; 1 (one line on stderr) when a package is missing; 2 on bad input."""
    return run_tool("python -m mxd_fast.probe", REQUIRED, "mxd_fast.train.probe:run", argv)


if __name__ == "__main__":
    sys.exit(main())
