"""Checks a command of bench/gpu_session.sh without running it, on any machine (no GPU needed):

    python -m bench.dry_run [env VAR=VALUE ...] [compute-sanitizer OPTIONS] python -m MODULE ARGS...

- `python -m pytest ARGS`: pytest collects ARGS (paths, -k, -m, plugin options such as --timeout and -n)
  and runs nothing;
- `python -m MODULE ARGS`: the module imports and its options parse; for the project's own tools the
  names inside the options are resolved too (shapes, ops, modes and providers of `bench`, `bench.profile`
  and `bench.tune_gate`; the training options of `mxd_fast.train` and, after `--`, of
  `bench.train_compare`), with the device taken as CUDA;
- a tool the GPU machine has and this one may lack (compute-sanitizer, nvidia-smi) is reported, not run.

Exit status 0 when the command would start, else 1 with the reason. Used by `DRY_RUN=1 bash
bench/gpu_session.sh`, which passes every stage's command here instead of running it."""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys

GPU_TOOLS = ("compute-sanitizer", "nvidia-smi", "ncu")


class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args with the parsed namespace, to stop the tool there."""

    def __init__(self, parser, namespace):
        super().__init__("parsed")
        self.parser, self.namespace = parser, namespace


def _strip_wrappers(argv: list[str]) -> tuple[list[str], list[str]]:
    """(notes, the python command) with `env VAR=VALUE` and a GPU tool's wrapper removed."""
    notes = []
    while argv:
        head = os.path.basename(argv[0])
        if head == "env":
            argv = argv[1:]
            while argv and "=" in argv[0] and not argv[0].startswith("-"):
                argv = argv[1:]
        elif head in GPU_TOOLS:
            found = shutil.which(argv[0])
            notes.append(f"{head}: {'found at ' + found if found else 'not on this machine (the GPU machine has it)'}")
            argv = argv[1:]
            while argv and argv[0].startswith("-"):   # the wrapper's own options, all of the --name=value form
                argv = argv[1:]
        else:
            return notes, argv
    return notes, argv


def _parse_only(module: str, args: list[str]):
    """Import `module` and run it as __main__ until its first parse_args; returns (parser, namespace)."""
    import runpy

    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(self, original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    argv, sys.argv = sys.argv, [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed as parsed:
        return parsed.parser, parsed.namespace
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = argv
    raise SystemExit(f"{module}: finished without parsing any options")


def _check_trainer_options(argv: list[str]) -> None:
    """The trainer's options parse and resolve (a CUDA device taken as present)."""
    from mxd_fast.train.cli import build_parser, require_packages, resolve_options

    args = build_parser().parse_args(argv)
    require_packages(args)
    if str(args.device).startswith("cuda"):
        args.device = "cpu"
    resolve_options(args)


def _check_names(module: str, parser, args) -> None:
    """The names inside the project's tools' options, resolved as the tools resolve them on a GPU."""
    if module == "bench":
        from bench.cli import PROVIDERS, name_list, select_jobs
        select_jobs(args, "cuda")
        name_list("--providers", args.providers, PROVIDERS, "provider")
    elif module in ("bench.profile", "bench.tune_gate"):
        importlib.import_module(module).resolve_shapes(parser, args, "cuda")
    elif module == "bench.train_compare":
        rest = list(args.train_args)
        _check_trainer_options(rest[1:] if rest[:1] == ["--"] else rest)


def check(argv: list[str]) -> list[str]:
    """Notes on the command `argv` if it would start; SystemExit naming what would fail otherwise."""
    notes, argv = _strip_wrappers(list(argv))
    if len(argv) < 3 or argv[1] != "-m":
        raise SystemExit(f"not a `python -m MODULE` command: {' '.join(argv)!r}")
    module, args = argv[2], argv[3:]
    if module == "pytest":   # -n N (xdist's workers) as -n 0: the option is checked, no worker starts
        args = ["0" if i and args[i - 1] == "-n" else a for i, a in enumerate(args)]
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
                              capture_output=True, text=True)
        if done.returncode == 5:
            raise SystemExit(f"pytest collects no test from {' '.join(args)}")
        if done.returncode != 0:
            raise SystemExit(f"pytest cannot collect {' '.join(args)}:\n{(done.stdout + done.stderr)[-3000:]}")
        counts = [int(line.rsplit(": ", 1)[1]) for line in done.stdout.splitlines()
                  if line.startswith("tests") and line.rsplit(": ", 1)[-1].isdigit()]
        collected = next((line for line in done.stdout.splitlines() if " collected" in line), None)
        return notes + [collected or f"pytest: {sum(counts)} tests in {len(counts)} files collected"]
    if module == "mxd_fast.train":
        _check_trainer_options(args)
        return notes + ["mxd_fast.train: options resolve"]
    parser, namespace = _parse_only(module, args)
    _check_names(module, parser, namespace)
    return notes + [f"{module}: options parse and resolve"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        notes = check(argv)
    except SystemExit as e:
        if e.code in (0, None):
            return 0
        print(f"dry run: FAILS: {e.code}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"dry run: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
