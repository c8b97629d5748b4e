"""Where the time of one benchmark case goes: the kernels of a few timed calls, from torch.profiler.

    python -m bench.profile --op mxd_decode --mode fwd+bwd --provider cuda --shape pythia-1.4b:K=128
    python -m bench.profile --op train --mode fwd+bwd --provider triton --shape gpt2:T=2048 --dtype bf16

Prints the profiler's table of the most expensive operators and kernels (self device time, or self
CPU time on a CPU), after warm-up calls that keep compilation and autotuning out of it.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import cases as C
from . import shapes as S
from .cli import DTYPES, pick_device, positive_int


def profile(op: str, mode: str, provider: str, shape: S.Shape, dtype: torch.dtype, device: torch.device,
            calls: int = 5, warmup: int = 3, rows: int = 20) -> str:
    """The profiler table of `calls` calls of one case (after `warmup` untimed calls)."""
    from torch.profiler import ProfilerActivity

    fn, inputs = C.make_case(op, mode, provider, shape, dtype, device).build(copies=1)
    for _ in range(warmup):
        fn(inputs[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(calls):
            fn(inputs[0])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            return events.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return events.table(row_limit=rows)


def resolve_shapes(p: argparse.ArgumentParser, args, device_type: str) -> list:
    """The one shape --shape names on `device_type`, after --mode and --provider are checked against --op;
    p.error naming the option otherwise (also used by bench.dry_run)."""
    if args.mode not in C.modes_for(args.op):
        p.error(f"mode {args.mode!r} does not apply to {args.op} (use one of {C.modes_for(args.op)})")
    if args.provider not in C.all_providers(args.op):
        p.error(f"provider {args.provider!r} does not apply to {args.op} (use one of {C.all_providers(args.op)})")
    try:
        shapes = S.resolve(S.split_specs(args.shape), device_type)
    except ValueError as e:
        p.error(f"--shape: {e}")
    if len(shapes) != 1:
        p.error(f"--shape {args.shape!r} names {len(shapes)} shapes; profile one at a time")
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", required=True, choices=C.OPS)
    p.add_argument("--mode", default="fwd+bwd", choices=(*C.OP_MODES, C.TRAIN_MODE))
    p.add_argument("--provider", default="torch")
    p.add_argument("--shape", default="small", help="a shape spec as in python -m bench --shapes")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when present)")
    p.add_argument("--calls", type=positive_int, default=5, help="profiled calls (after 3 warm-up calls)")
    p.add_argument("--rows", type=positive_int, default=20, help="rows of the printed table")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    (shape,) = resolve_shapes(p, args, device.type)
    reason = C.provider_unavailable(args.provider, device)
    if reason is not None:
        p.error(f"provider {args.provider!r} cannot run here: {reason}")
    print(f"{args.op} {args.mode} [{args.provider}] {shape.label()} {args.dtype} on {device}: {args.calls} calls")
    print(profile(args.op, args.mode, args.provider, shape, DTYPES[args.dtype], device, args.calls, rows=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
