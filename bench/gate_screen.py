"""The exact top-k gate on the CPU (fp32): screened vs direct vs the dense reference, side by side.

    python -m bench.gate_screen --tokens 2048 --threads 2
    python -m bench.gate_screen --shapes gpt2,sweep-k --layer --reps 5 --out gate_screen.json

Per shape, the gate forward of three providers, timed in turns on the same inputs:
- dense: addmm + relu + torch.topk (forms the [T, N] logits);
- direct: the torch backend's tiled fp32 forward (MXD_FAST_EXACT_GATE=direct);
- screened: the bf16 screen with certified fp32 rescoring (mxd_fast/_torch/screened_gate.py).
Then the ratios direct / screened and dense / screened and the share of rows the screened calls retried
with more candidates or recomputed by the direct path. --layer adds a whole MxD layer's forward+backward:
the paper's dense form, and the torch backend with MXD_FAST_EXACT_GATE=direct vs screened (ratios
direct / screened and reference / screened); a "screened" layer whose gate never
screened (inputs the screen does not take) is flagged.

Inputs are random (x ~ N(0, 1), gate rows N(0, 1/d), bias N(0, 0.01)). Default shapes: GPT-2's
(768 x 21490, K = 32) and the CPU sweeps over K and N of the main bench (python -m bench); --tokens sets
the tokens of every shape. --run RUN_FOLDER (repeatable) adds a trained gate: the gate (MxD) or encoder
(transcoder) of a run folder of python -m mxd_fast.train, on its MLP inputs over the run's held-out text
(--run-tokens of them): the same three providers, the retry and fallback shares, and whether the screened
selection equals the direct one (the experts selected with a positive value; those at 0 are relu's ties).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

import mxd_fast
from mxd_fast._torch import screened_gate as sg
from mxd_fast._torch.topk_gate import topk_gate_direct_forward

from . import shapes as S
from . import timing as T
from .cli import positive_int

COPIES = 2   # input sets the timed calls rotate over


def _with_mode(mode: str, fn, *args):
    old = os.environ.get(sg.ENV_VAR)
    os.environ[sg.ENV_VAR] = mode
    try:
        return fn(*args)
    finally:
        if old is None:
            del os.environ[sg.ENV_VAR]
        else:
            os.environ[sg.ENV_VAR] = old


def direct(x, w, b, k):
    """The torch backend's forward with screening off."""
    return topk_gate_direct_forward(x, w, b, k)


def dense(x, w, b, k):
    return torch.addmm(b, x, w.T).relu_().topk(k, dim=1)


def screened(x, w, b, k):
    return sg.screened_topk_gate(x, w, b, k, direct)


def random_gate(s: S.Shape, seed: int, device="cpu", dtype=torch.float32) -> tuple:
    """(x [T, d] ~ N(0, 1), gate weight [N, d] ~ N(0, 1/d), bias [N] ~ N(0, 0.01)) of shape s."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s.T, s.d, generator=g)
    w = torch.randn(s.N, s.d, generator=g) / s.d ** 0.5
    b = torch.randn(s.N, generator=g) * 0.1
    return tuple(t.to(device=device, dtype=dtype) for t in (x, w, b))


def _inputs(s: S.Shape) -> list:
    return [random_gate(s, c) for c in range(COPIES)]


def positive_selections_differ(values, indices, other_values, other_indices):
    """Per row, whether two top-k selections differ in the experts they select with a positive value.
    relu's zeros tie: an index with value 0 may be any expert whose logit is <= 0, so those are left out."""
    positive = [torch.where(v > 0, i, -1).sort(1).values for v, i in ((values, indices),
                                                                     (other_values, other_indices))]
    return (positive[0] != positive[1]).any(1)


def ms_summary(t) -> dict:
    if isinstance(t, Exception):
        return {"error": f"{type(t).__name__}: {t}"}
    return {"ms": t.median * 1e3, "p20_ms": t.p20 * 1e3, "p80_ms": t.p80 * 1e3, "reps": t.reps}


def gate_row(s: S.Shape, cfg: T.TimingConfig) -> dict:
    """Times the three gate providers at shape s; the screened calls' retry and fallback shares."""
    inputs = _inputs(s)
    fns = [lambda i, f=f: f(*i, s.K) for f in (dense, direct, screened)]
    sg.reset_screen_stats()
    timings = T.time_interleaved(fns, inputs, cfg)
    stats = sg.screen_stats()
    row = {"shape": s.label(), **{name: ms_summary(t) for name, t in zip(("dense", "direct", "screened"), timings)},
           "screen_stats": stats}
    rows = max(stats["rows_screened"], 1)
    row["retried"] = stats["rows_retried"] / rows
    row["fallback"] = stats["rows_fallback"] / rows
    row["screened_calls"] = stats["calls"]
    return row


def layer_row(s: S.Shape, cfg: T.TimingConfig) -> dict:
    """A whole MxD layer's forward+backward: the paper's dense form (mxd_fast.reference) and the torch
    backend with the gate exact by direct vs screened."""
    torch.manual_seed(0)
    layer = mxd_fast.MxD(s.d, s.H, s.d, s.N, s.K, activation="gelu")
    inputs = [torch.randn(s.T, s.d, generator=torch.Generator().manual_seed(c)) for c in range(COPIES)]

    def step(x, mode):
        def run():
            layer.zero_grad(set_to_none=True)
            if mode == "reference":
                mxd_fast.reference.mxd_forward(layer, x.requires_grad_()).square().mean().backward()
                return
            with mxd_fast.use_backend("torch"):
                layer(x.requires_grad_()).square().mean().backward()
        return _with_mode("direct" if mode == "reference" else mode, run)

    sg.reset_screen_stats()
    timings = T.time_interleaved([lambda x, m=m: step(x, m) for m in ("reference", "direct", "screened")], inputs,
                                 cfg)
    calls = sg.screen_stats()["calls"]
    return {"shape": s.label(), "layer_reference": ms_summary(timings[0]), "layer_direct": ms_summary(timings[1]),
            "layer_screened": ms_summary(timings[2]), "layer_screened_calls": calls}


def trained_inputs(folder: str, tokens: int) -> tuple:
    """(x [tokens, d] MLP inputs at the run's layer over its held-out text, gate weight, bias, k, label)."""
    from mxd_fast.train import load_layer
    from mxd_fast.train import data as D
    from mxd_fast.train.run_folders import context_length, held_out_documents, read_run_folder
    run = read_run_folder(folder, "--run")
    layer = load_layer(run.folder)
    gate = layer.gate if isinstance(layer, mxd_fast.MxD) else layer.encoder
    model, tokenizer = D.load_model(run.model)
    context = context_length(run)
    contexts = D.held_out_contexts(held_out_documents(run, None, "--run")[0], tokenizer, context,
                                   -(-tokens // context))
    with D.Harvester(model, run.layer_index) as harvester:
        x = torch.cat([harvester.harvest(contexts[i:i + 8])[0] for i in range(0, contexts.shape[0], 8)])
    label = f"trained {run.arch} layer {run.layer_index} ({gate.weight.shape[1]} x {gate.n}, K = {gate.k})"
    return x[:tokens].float().contiguous(), gate.weight.detach(), gate.bias.detach(), gate.k, label


def trained_gate_row(folder: str, tokens: int, cfg: T.TimingConfig) -> dict:
    """The three gate providers on a trained gate and its real inputs; the screened selection against the
    direct one (indices as sets, values to fp32 rounding)."""
    x, w, b, k, label = trained_inputs(folder, tokens)
    reference_values, reference_indices = direct(x, w, b, k)
    sg.reset_screen_stats()
    values, indices = screened(x, w, b, k)
    once = sg.screen_stats()
    value_error = float((values - reference_values).abs().max()) if values.numel() else 0.0
    differ = positive_selections_differ(values, indices, reference_values, reference_indices)
    fns = [lambda i, f=f: f(*i, k) for f in (dense, direct, screened)]
    timings = T.time_interleaved(fns, [(x, w, b), (x.clone(), w, b)], cfg)
    rows = max(once["rows_screened"], 1)
    return {"shape": label, "run": folder, "tokens": int(x.shape[0]),
            **{name: ms_summary(t) for name, t in zip(("dense", "direct", "screened"), timings)},
            "screen_stats": once, "retried": once["rows_retried"] / rows, "fallback": once["rows_fallback"] / rows,
            "screened_calls": once["calls"], "rows_with_other_indices": int(differ.sum()),
            "max_value_difference": value_error}


def ratio(row: dict, num: str, den: str) -> str:
    a, b = row.get(num, {}), row.get(den, {})
    return f"{a['ms'] / b['ms']:.2f}" if "ms" in a and "ms" in b else "-"


def _cell(t: dict) -> str:
    return f"{t['ms']:.1f}" if "ms" in t else "error"


def print_header() -> None:
    print(f"{'shape':44s} {'dense ms':>9s} {'direct ms':>10s} {'screen ms':>10s} {'dir/scr':>8s} "
          f"{'dense/scr':>9s} {'retried':>8s} {'fallback':>8s}")


def print_row(r: dict) -> None:
    print(f"{r['shape']:44s} {_cell(r['dense']):>9s} {_cell(r['direct']):>10s} {_cell(r['screened']):>10s} "
          f"{ratio(r, 'direct', 'screened'):>8s} {ratio(r, 'dense', 'screened'):>9s} "
          f"{r['retried']:>8.2%} {r['fallback']:>8.2%}{'' if r['screened_calls'] else '  (not screenable)'}")
    if "rows_with_other_indices" in r:
        print(f"  {r['tokens']} held-out tokens; rows whose positive selections differ from "
              f"direct's: {r['rows_with_other_indices']}; largest value difference {r['max_value_difference']:.3g}")
    if "layer_direct" in r:
        note = "" if r["layer_screened_calls"] else "  (the layer's gate never screened)"
        print(f"{'  layer fwd+bwd ms, reference / direct / screened':44s} {_cell(r['layer_reference']):>9s} "
              f"{_cell(r['layer_direct']):>10s} {_cell(r['layer_screened']):>10s} "
              f"{ratio(r, 'layer_direct', 'layer_screened'):>8s} {ratio(r, 'layer_reference', 'layer_screened'):>9s}"
              f"{note}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gate_screen", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="gpt2,sweep-k,sweep-n",
                   help="shape specs as in python -m bench (default: gpt2,sweep-k,sweep-n)")
    p.add_argument("--tokens", type=positive_int, help="tokens T of every shape")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the cores this process may use)")
    p.add_argument("--reps", type=positive_int, help="timed calls per provider (default: about 1 s each)")
    p.add_argument("--layer", action="store_true", help="also time a whole MxD layer's forward+backward")
    p.add_argument("--run", action="append", default=[], metavar="RUN_FOLDER",
                   help="also a trained gate: a run folder of python -m mxd_fast.train (repeatable)")
    p.add_argument("--run-tokens", type=positive_int, default=4096,
                   help="held-out tokens of each --run (default: 4096)")
    p.add_argument("--reuse-freed-memory", action="store_true",
                   help="mxd_fast.reuse_freed_memory() before timing (default: off)")
    p.add_argument("--out", help="write the rows as JSON to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        shapes = S.resolve(S.split_specs(args.shapes), "cpu")
    except ValueError as e:
        raise SystemExit(f"--shapes: {e}") from None
    if args.tokens:
        shapes = [dataclasses.replace(s, T=args.tokens) for s in shapes]
    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    reused = mxd_fast.reuse_freed_memory() if args.reuse_freed_memory else False
    cfg = T.TimingConfig.for_device(torch.device("cpu"), quick=False)
    if args.reps:
        cfg = T.TimingConfig(warmup_calls=1, min_reps=args.reps, max_reps=args.reps, target_time=0.0)
    print(f"gate screening on {T.cpu_name()}, {torch.get_num_threads()} threads, fp32; bf16 screen sound: "
          f"{sg.bf16_screen_sound()}, auto would screen: {sg.screening_supported()}")
    print_header()
    rows = []
    for s in shapes:
        row = gate_row(s, cfg)
        if args.layer:
            row.update(layer_row(s, cfg))
        rows.append(row)
        print_row(row)
    for folder in args.run:
        try:
            row = trained_gate_row(folder, args.run_tokens, cfg)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--run {folder}: {e}") from None
        rows.append(row)
        print_row(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "reuse_freed_memory": reused, "versions": T.versions(),
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
