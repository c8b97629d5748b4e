"""python -m mxd_fast.steer: the paper's steering protocol, offline, for trained MxD layers and TopK transcoders;
see mxd_fast.train.steer and docs/steering.md.

The package exports the function mxd_fast.steer (mxd_fast.hooks.steer), and importing this module binds the
module to that same name: the module is callable and calls the function, so `mxd_fast.steer(layer, expert=n,
scale=c)` steers either way."""
from __future__ import annotations

import importlib.util
import sys
import types
from typing import Optional, Sequence

from .hooks import steer as _steer_function

INSTALL = "pip install 'mxd_fast[train]'"
# import name -> package name, for what steering needs beyond torch
REQUIRED = {"transformers": "transformers", "matplotlib": "matplotlib", "safetensors": "safetensors",
            "gguf": "gguf"}


def missing_packages() -> list:
    return [package for module, package in REQUIRED.items() if importlib.util.find_spec(module) is None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0 when the outputs are written; 1 (one line on stderr) when a package is missing; 2 on bad input, with
    a one-line error naming the argument."""
    missing = missing_packages()
    if missing:
        print(f"python -m mxd_fast.steer needs {', '.join(missing)}, not installed: {INSTALL}", file=sys.stderr)
        return 1
    from mxd_fast.train.steer import run

    try:
        run(argv)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"python -m mxd_fast.steer: error: {err}", file=sys.stderr)
        return 2
    return 0


class _CallableModule(types.ModuleType):
    """This module, called as mxd_fast.hooks.steer."""

    def __call__(self, *args, **kwargs):
        return _steer_function(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
