"""Times the Triton gate's kernel configurations and splits over N at chosen shapes, side by side with
addmm + relu + torch.topk and with what the op itself picks, to choose its defaults from:

    python -m bench.tune_gate --shapes pythia-1.4b,pythia-1.4b:K=128 --splits 1,2,3,4,6 --out tune.json

Every configuration of kernels/topk_gate.py that fits the GPU (registers, shared memory) is timed at
every split; "op" is the op's own choice (its default configuration and split, or the autotuned
configuration with MXD_FAST_AUTOTUNE=1). Needs a GPU (or TRITON_INTERPRET=1 and tiny shapes, which
checks that it runs, not how fast).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from . import shapes as S
from . import timing as T
from .cli import DTYPES, pick_device, positive_int, positive_ints


def _inputs(shape: S.Shape, dtype: torch.dtype, device: torch.device, copies: int) -> list:
    out = []
    for c in range(copies):
        g = torch.Generator(device=device).manual_seed(c)
        x = torch.randn(shape.T, shape.d, device=device, generator=g).to(dtype)
        w = (torch.randn(shape.N, shape.d, device=device, generator=g) / shape.d ** 0.5).to(dtype)
        b = (torch.randn(shape.N, device=device, generator=g) * 0.1).to(dtype)
        out.append((x, w, b))
    return out


def candidates(k: int, x: torch.Tensor) -> list[dict]:
    """The configurations of the gate kernel that fit the GPU of x for this k (as _forward's `config`)."""
    from mxd_fast.kernels import topk_gate as tg

    k_pad = tg._next_pow2(k)
    limit = tg.shared_memory_limit(x)
    out = []
    for c in tg._cuda_configs():
        if tg._fits(c.kwargs, k_pad, c.num_warps, c.num_stages, x.element_size(), limit):
            out.append(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def label(config: dict) -> str:
    c = config
    extra = " full-merge" if c.get("FULL_MERGE") else ""
    return f"{c['BLOCK_B']}x{c['BLOCK_N']}x{c['BLOCK_I']} w{c['num_warps']} s{c['num_stages']}{extra}"


def tune(shape: S.Shape, dtype: torch.dtype, device: torch.device, splits: list[int], cfg: T.TimingConfig,
         log=print, on_row=lambda row: None) -> list[dict]:
    """The rows of one shape; on_row(row) is called as each is measured (to save what a time limit
    would otherwise lose)."""
    from mxd_fast.kernels import topk_gate as tg

    inputs = _inputs(shape, dtype, device, copies=2)
    k = shape.K
    rows = []

    def baseline(inp):
        x, w, b = inp
        return torch.topk(torch.addmm(b, x, w.T).relu_(), k, dim=1)

    baseline_values = baseline(inputs[0])[0].float()

    def record(name, split, fn):
        try:
            values = fn(inputs[0])[0].float()   # a wrong selection is reported, not timed
            err = (values - baseline_values).abs().max().item()
            if err > 0.02 * (baseline_values.abs().max().item() + 1.0):
                raise AssertionError(f"values differ from torch.topk's by {err:.3g}")
            t = T.time_calls(fn, inputs, device, cfg)
            row = {"shape": shape.name, "config": name, "split": split, "median_ms": t.median * 1e3,
                   "p20_ms": t.p20 * 1e3, "p80_ms": t.p80 * 1e3}
        except Exception as e:  # noqa: BLE001 - a configuration that fails is reported, not fatal
            row = {"shape": shape.name, "config": name, "split": split, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        on_row(row)
        log(f"  {name:40s} split {str(split):5s} " + (f"{row['median_ms']:.3f} ms" if "median_ms" in row
                                                        else row["error"][:120]))

    record("addmm+relu+topk", "-", baseline)
    auto = tg._choose_split(shape.T, shape.N, inputs[0][0])
    record("op", auto, lambda inp: tg.topk_gate_forward(*inp, k))
    for config in candidates(k, inputs[0][0]):
        for split in splits:
            record(label(config), split, lambda inp, c=config, s=split: tg._forward(*inp, k, split=s, config=dict(c)))
    base = rows[0].get("median_ms")
    for row in rows:
        if base and "median_ms" in row:
            row["speedup_vs_addmm_topk"] = base / row["median_ms"]
    return rows


def resolve_shapes(p: argparse.ArgumentParser, args, device_type: str) -> list:
    """The shapes --shapes names on `device_type`; p.error naming --shapes otherwise (also used by
    bench.dry_run)."""
    try:
        return S.resolve(S.split_specs(args.shapes), device_type)
    except ValueError as e:
        p.error(f"--shapes: {e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tune_gate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="pythia-1.4b,pythia-1.4b:K=128,llama-3.2-3b")
    p.add_argument("--splits", type=positive_ints, default=[1, 2, 3, 4, 6],
                   help="splits over N to time (comma-separated)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda[:i] (default), or cpu with TRITON_INTERPRET=1")
    p.add_argument("--top", type=positive_int, default=8, help="fastest rows printed per shape")
    p.add_argument("--out", default=None, help="JSON file for every row (rewritten as each row is measured)")
    args = p.parse_args(argv)
    device = pick_device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("needs a CUDA device (or TRITON_INTERPRET=1 for a run that checks the script on tiny shapes)")
    shapes = resolve_shapes(p, args, device.type)
    cfg = T.TimingConfig.for_device(device, quick=device.type != "cuda")
    meta = {"device": T.device_name(device), "versions": T.versions(), "commit": T.git_commit(),
            "dtype": args.dtype, "autotune": os.environ.get("MXD_FAST_AUTOTUNE", "1")}
    rows = []

    def save(final: bool = False) -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta if final else {**meta, "partial": True}, "rows": rows}, f, indent=1)

    try:
        save()                          # a path that cannot be written fails now, not after the timing
    except OSError as e:
        p.error(f"--out {args.out}: cannot write there: {e.strerror or e}")
    for shape in shapes:
        print(f"{shape.name}: T={shape.T} d={shape.d} N={shape.N} K={shape.K} {args.dtype}")
        part = tune(shape, DTYPES[args.dtype], device, args.splits, cfg, on_row=lambda row: (rows.append(row), save()))
        timed = sorted((r for r in part if "median_ms" in r), key=lambda r: r["median_ms"])
        print(f"fastest of {shape.name}:")
        for r in timed[:args.top]:
            print(f"  {r['config']:40s} split {str(r['split']):5s} {r['median_ms']:.3f} ms "
                  f"({r.get('speedup_vs_addmm_topk', float('nan')):.2f}x addmm+relu+topk)")
    if args.out:
        save(final=True)
        print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
