"""Trains MxD and its baselines at several K with the same recipe, budget, data and seed, and tables
their fidelity side by side (the paper's comparison: CE increase when spliced in, at equal parameters
and equal K):

    python -m bench.train_compare --k 16,32,64 --archs mxd,transcoder --jobs 2 --out runs/compare \\
        -- --tokens 20000000 --budget 32

Everything after `--` goes to every `python -m mxd_fast.train` run (model, layer, tokens, budget, ...),
except the MxD-only options (--hidden, --activation, --glu), which go to the MxD runs only. Each run gets
its own folder `<out>/<arch>-k<K>` and its own log. --jobs runs several trainings at once (one device is
often far from busy with one small layer). The table is printed and written to `<out>/compare.md` and
`<out>/compare.json`; runs that failed are listed with their log's tail. A run folder that holds a run
is refused by the trainer: pass `-- --overwrite` to replace earlier runs, or `-- --resume` to continue them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from mxd_fast.train import ARCHS, METRICS_FILE

from .cli import positive_ints

# columns: (metrics key, header, format)
COLUMNS = (("delta_ce", "CE increase", "{:+.4f}"), ("kl_spliced", "KL", "{:.4f}"),
           ("ce_recovered", "CE recovered", "{:.1%}"), ("eval_nmse", "held-out NMSE", "{:.4f}"),
           ("nmse", "train NMSE", "{:.4f}"), ("dead_fraction", "dead", "{:.3f}"), ("tokens", "tokens", "{:,}"),
           ("tokens_per_s", "tok/s", "{:,.0f}"), ("parameters", "params", "{:,}"))


def _archs(text: str) -> list[str]:
    names = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ARCHS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"unknown arch {bad or text!r}; choose from {', '.join(ARCHS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.train_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=positive_ints, default=[16, 32, 64], help="comma-separated K values")
    p.add_argument("--archs", type=_archs, default=["mxd", "transcoder"], help="comma-separated archs")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once")
    p.add_argument("--out", default="runs/compare", help="folder for the runs and the table")
    p.add_argument("--timeout", type=float, default=None, help="seconds after which a run is killed")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then options for every training run")
    return p


def _run_dir(out: Path, arch: str, k: int) -> Path:
    return out / f"{arch}-k{k}"


MXD_ONLY = ("--hidden", "--activation", "--glu")   # the trainer refuses them for the transcoders


def args_for_arch(train_args: list[str], arch: str) -> list[str]:
    """The training options with the MxD-only ones (and their values) left out for the other archs."""
    if arch == "mxd":
        return list(train_args)
    kept, skip = [], False
    for a in train_args:
        if skip:
            skip = False
        elif a in MXD_ONLY:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in MXD_ONLY)):
            kept.append(a)
    return kept


def _launch(out: Path, arch: str, k: int, train_args: list[str]) -> tuple[subprocess.Popen, Path]:
    train_args = args_for_arch(train_args, arch)
    folder = _run_dir(out, arch, k)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "train.log"
    cmd = [sys.executable, "-m", "mxd_fast.train", *train_args, "--arch", arch, "--k", str(k), "--out", str(folder),
           "--quiet"]
    with open(log, "w") as fh:   # the child keeps its own descriptor
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT), log


def run_all(out: Path, archs: list[str], ks: list[int], train_args: list[str], jobs: int,
            timeout: float | None, log=print) -> dict:
    """Runs every (arch, k) training, at most `jobs` at once; returns {(arch, k): error text or None}."""
    pending = [(a, k) for k in ks for a in archs]
    running: dict = {}
    errors: dict = {}
    killed: set = set()
    while pending or running:
        while pending and len(running) < jobs:
            arch, k = pending.pop(0)
            proc, path = _launch(out, arch, k, train_args)
            running[(arch, k)] = (proc, path, time.monotonic())
            log(f"started {arch} K={k} (log {path})")
        time.sleep(0.2)
        for key, (proc, path, t0) in list(running.items()):
            if proc.poll() is None and timeout is not None and time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
                killed.add(key)
            if proc.poll() is None:
                continue
            del running[key]
            tail = "\n".join(path.read_text(errors="replace").splitlines()[-8:])
            why = f"killed after --timeout {timeout:g} s" if key in killed else f"exit {proc.returncode}"
            errors[key] = None if proc.returncode == 0 else f"{why}:\n{tail}"
            log(f"{key[0]} K={key[1]}: " + ("done" if proc.returncode == 0 else f"failed ({path})"))
    return errors


def collect(out: Path, archs: list[str], ks: list[int], failed=()) -> list[dict]:
    """One row per run: its metrics.json, none for the (arch, k) in `failed` (an older run's file may be there)."""
    rows = []
    for k in ks:
        for arch in archs:
            path = _run_dir(out, arch, k) / METRICS_FILE
            m = json.loads(path.read_text()) if path.exists() and (arch, k) not in failed else {}
            rows.append({"arch": arch, "k": k, **m})
    return rows


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def table(rows: list[dict], archs: list[str]) -> str:
    """Markdown: one row per (K, arch), then per K the ratio of each baseline's CE increase to MxD's."""
    head = ["K", "arch"] + [h for _, h, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([str(r["k"]), r["arch"]] + [_cell(r, key, f) for key, _, f in COLUMNS]) + " |")
    first = next((r for r in rows if r.get("ce_clean") is not None), None)
    if first is not None:
        lines.append("")
        lines.append(f"CE clean {first['ce_clean']:.4f}; with the MLP zero-ablated "
                     f"{first['ce_zero_ablation']:.4f} ({first['delta_ce_zero_ablation']:+.4f}).")
    if "mxd" in archs:
        for k in dict.fromkeys(r["k"] for r in rows):
            by = {r["arch"]: r for r in rows if r["k"] == k}
            for key, what in (("delta_ce", "CE increase"), ("kl_spliced", "KL from the clean model")):
                m = by.get("mxd", {}).get(key)
                parts = []
                for arch in archs:
                    d = by.get(arch, {}).get(key)
                    if arch == "mxd" or d is None or m is None:
                        continue
                    ratio = f"{d / m:.2f}x MxD's" if m > 0 and d > 0 else "no ratio: not both positive"
                    parts.append(f"{arch} {d:+.4f} ({ratio})")
                if parts:
                    lines.append(f"K = {k}: {what} MxD {m:+.4f}; " + "; ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    for flag in ("--arch", "--k", "--out"):
        if any(a == flag or a.startswith(flag + "=") for a in train_args):
            raise SystemExit(f"{flag} is set by bench.train_compare for each run; leave it out of the training options")
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    errors = run_all(out, args.archs, args.k, train_args, args.jobs, args.timeout)
    rows = collect(out, args.archs, args.k, failed={key for key, e in errors.items() if e})
    text = table(rows, args.archs)
    failed = {f"{a} K={k}": e for (a, k), e in errors.items() if e}
    if failed:
        text += "\n\nfailed runs:\n" + "\n".join(f"- {name}: {e}" for name, e in failed.items())
    print(text)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps({"train_args": train_args, "rows": rows,
                                                  "failed": failed}, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
