"""python -m mxd_fast.steer: the paper's steering protocol, offline, for trained MxD layers and TopK transcoders;
see mxd_fast.train.steer and docs/steering.md.

The package exports the function mxd_fast.steer (mxd_fast.hooks.steer), and importing this module binds the
module to that same name: the module is callable and calls the function, so `mxd_fast.steer(layer, expert=n,
scale=c)` steers either way."""
from __future__ import annotations

import sys
import types
from typing import Optional, Sequence

from ._entry import run_tool
from .hooks import steer as _steer_function

# import name -> package name, for what steering needs beyond torch
REQUIRED = {"transformers": "transformers", "matplotlib": "matplotlib", "safetensors": "safetensors",
            "gguf": "gguf"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the outputs are written; 1 (one line on stderr) when a package is missing; 2 on bad input."""
    return run_tool("python -m mxd_fast.steer", REQUIRED, "mxd_fast.train.steer:run", argv)


class _CallableModule(types.ModuleType):
    """This module, called as mxd_fast.hooks.steer."""

    def __call__(self, *args, **kwargs):
        return _steer_function(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
