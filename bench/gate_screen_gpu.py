"""The fp8-screened Triton gate (kernels/screened_gate.py) against the exact gates, side by side.

    python -m bench.gate_screen_gpu                         # Llama-3.2-3B's width on the GPU, bf16
    python -m bench.gate_screen_gpu --shapes pythia-1.4b,llama-3.2-3b --tokens 4096 --out screen.json

First the accumulation self-check (`fp8_screen_sound`) and the bound checked element by element on its
adversarial inputs and on each shape's inputs (`bound_violations`: screened bounds below the exact
logit; must be 0). Then, per shape, three gates timed in turns on the same inputs: addmm + relu +
torch.topk, the exact Triton gate and the screened one; the ratios, the share of rows the screen
certified, and whether its selection equals the exact gate's. Inputs are random (x ~ N(0, 1), gate rows
N(0, 1/d), bias N(0, 0.01)). Runs on the CPU under TRITON_INTERPRET=1 too, at small shapes (a check
that it works, not a measurement).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch

from . import shapes as S
from . import timing as T
from .cli import positive_int
from .gate_screen import dense, ms_summary, positive_selections_differ, random_gate, ratio


def shape_row(s: S.Shape, device, dtype, cfg: T.TimingConfig) -> dict:
    from mxd_fast.kernels import screened_gate as sk
    from mxd_fast.kernels import topk_gate as tk
    x, w, b = random_gate(s, 0, device, dtype)
    exact_values, exact_indices = tk.topk_gate_forward(x, w, b, s.K)
    sk.reset_screen_stats()
    values, indices = sk.screened_topk_gate_forward(x, w, b, s.K)
    stats = sk.screen_stats()
    fns = [lambda i, f=f: f(*i, s.K) for f in (dense, tk.topk_gate_forward, sk.screened_topk_gate_forward)]
    timings = T.time_interleaved(fns, [(x, w, b)], cfg)
    rows = max(stats["rows_screened"], 1)
    return {"shape": s.label(), "bound_violations": sk.bound_violations(x, w, b),
            **{name: ms_summary(t) for name, t in zip(("addmm_topk", "exact", "screened"), timings)},
            "screen_stats": stats, "certified": 1 - stats["rows_fallback"] / rows if stats["calls"] else 0.0,
            "rows_with_other_indices": int(positive_selections_differ(values, indices, exact_values,
                                                                          exact_indices).sum())}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gate_screen_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="llama-3.2-3b", help="shape specs as in python -m bench "
                   "(default: llama-3.2-3b, N = 90088)")
    p.add_argument("--tokens", type=positive_int, default=4096, help="tokens of every shape (default: 4096)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu under TRITON_INTERPRET=1")
    p.add_argument("--out", help="write the results as JSON to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mxd_fast.kernels import screened_gate as sk
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    try:
        shapes = [dataclasses.replace(s, T=args.tokens) for s in S.resolve(S.split_specs(args.shapes), device.type)]
    except ValueError as e:
        raise SystemExit(f"--shapes: {e}") from None
    sound = sk.fp8_screen_sound(device)
    adversarial = sk.bound_violations(*sk.adversarial_inputs(device, dtype))
    print(f"fp8 screen self-check: {'passed' if sound else 'FAILED'}; bound violations on its adversarial "
          f"inputs: {adversarial}")
    cfg = T.TimingConfig.for_device(device, quick=device.type != "cuda")
    rows = []
    print(f"{'shape':48s} {'addmm+topk':>10s} {'exact':>8s} {'screened':>9s} {'vs addmm':>8s} {'vs exact':>8s} "
          f"{'certified':>9s} {'violations':>10s} {'differ':>6s}")
    for s in shapes:
        r = shape_row(s, device, dtype, cfg)
        rows.append(r)
        cell = lambda t: f"{t['ms']:.3f}" if "ms" in t else "error"   # noqa: E731
        print(f"{r['shape']:48s} {cell(r['addmm_topk']):>10s} {cell(r['exact']):>8s} {cell(r['screened']):>9s} "
              f"{ratio(r, 'addmm_topk', 'screened'):>8s} {ratio(r, 'exact', 'screened'):>8s} "
              f"{r['certified']:>9.1%} {r['bound_violations']:>10d} {r['rows_with_other_indices']:>6d}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"self_check": sound, "adversarial_bound_violations": adversarial, "dtype": args.dtype,
                       "versions": T.versions(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
