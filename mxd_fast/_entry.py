"""The shared body of the `python -m mxd_fast.<tool>` entry points of the `train` extra: one line naming the
extra when a package is missing, one line naming the argument on bad input. Imports nothing heavy."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Mapping, Optional, Sequence

INSTALL = "pip install 'mxd_fast[train]'"


def run_tool(prog: str, required: Mapping[str, str], runner: str, argv: Optional[Sequence[str]]) -> int:
    """Run `runner` ("module:function") on argv. 0 when it finishes; 1 (one line on stderr) when a package of
    `required` (import name -> package name) is missing; 2 on bad input, with a one-line error."""
    missing = [package for module, package in required.items() if importlib.util.find_spec(module) is None]
    if missing:
        print(f"{prog} needs {', '.join(missing)}, not installed: {INSTALL}", file=sys.stderr)
        return 1
    module, function = runner.split(":")
    run = getattr(importlib.import_module(module), function)
    try:
        run(argv)
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0
