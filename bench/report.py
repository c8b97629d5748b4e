"""The results of a run: the printed table, the JSON file and the speedup plot."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from . import cases as C

MODE_WORDS = {"fwd+bwd": "forward + backward", C.TRAIN_MODE: "step"}


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


def _time(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


COLUMNS = ("op", "mode", "shape", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "%mm", "GB/s", "%bw",
           "peak MiB", "x ref", "note")


def table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        lines.append((
            r["op"], r["mode"], r["shape"], r["provider"],
            _time(r.get("median")),
            f"{_time(r.get('p20'))}-{_time(r.get('p80'))}" if r.get("median") is not None else "-",
            _fmt(r.get("tflops"), ".3g"),
            _fmt(None if r.get("frac_matmul") is None else 100 * r["frac_matmul"], ".0f"),
            _fmt(None if r.get("gbps") is None else r["gbps"], ".3g"),
            _fmt(None if r.get("frac_copy") is None else 100 * r["frac_copy"], ".0f"),
            _fmt(None if r.get("memory") is None else r["memory"] / 2**20, ".0f"),
            _fmt(None if r["provider"] in C.PARTIAL_PROVIDERS else r.get("speedup_vs_reference"), ".2f"),
            r.get("note", ""),
        ))
    widths = [max(len(COLUMNS[i]), *(len(str(line[i])) for line in lines)) if lines else len(COLUMNS[i])
              for i in range(len(COLUMNS))]
    out = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    prev = None
    for line in lines:
        key = line[:3]
        if prev is not None and key[:1] != prev[:1]:
            out.append("")
        prev = key
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
    return "\n".join(out)


def _commit(commit: str) -> str:
    """The short hash, keeping the mark of uncommitted changes."""
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def legend(meta: dict) -> str:
    c = meta["ceilings"]
    return "\n".join([
        f"device: {meta['device']} ({meta['device_name']}), dtype {meta['dtype']}, "
        f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}, commit {_commit(meta['git_commit'])}, "
        f"{meta['date']}",
        f"ceilings (the better of two measurements, at the start and at the end of this run): "
        f"matmul {c['matmul_n']}^3 {meta['dtype']} = "
        f"{c['matmul_flops'] / 1e12:.3g} TFLOP/s; copy of {c['copy_mib']} MiB = {c['copy_bytes'] / 1e9:.3g} GB/s"
        + (f"; {meta['threads']} threads, load average {meta['load_average'][0]:.1f} at the start, "
           f"{meta.get('load_average_end', (math.nan,))[0]:.1f} at the end; providers timed in turns call by call"
           if meta["device"] == "cpu" else ""),
        "TFLOP/s: the provider's own FLOPs (dense providers: dense products, sparse providers: K-sparse products; "
        "see bench/cases.py); %mm = TFLOP/s / matmul ceiling; GB/s: compulsory bytes / median, %bw = of the copy "
        "ceiling; peak MiB: " + meta["memory_method"] + "; x ref = reference median / median",
    ])


def summary(rows: list[dict]) -> str:
    """One line per training-step shape and mode: each provider's speedup over the dense reference of
    the same mode."""
    lines = []
    cases = list(dict.fromkeys((r["shape"], r["mode"]) for r in rows if r["op"] == "train"))
    for shape, mode in cases:
        sel = [r for r in rows if r["op"] == "train" and (r["shape"], r["mode"]) == (shape, mode)]
        ref = next((r for r in sel if r["provider"] == "reference" and r.get("median")), None)
        parts = []
        for r in sel:
            if r["provider"] == "reference" or not r.get("median"):
                continue
            ratio = r.get("speedup_vs_reference")
            parts.append(f"{r['provider']} {r['median'] * 1e3:.0f} ms" + (f" ({ratio:.2f}x)" if ratio else ""))
        head = f"training {MODE_WORDS.get(mode, mode)} {shape}, {sel[0]['dtype']}: reference "
        head += f"{ref['median'] * 1e3:.0f} ms" if ref else "not measured"
        lines.append(head + ("; " + "; ".join(parts) if parts else ""))
    return "\n".join(lines)


# (op, mode, baseline provider, what the ratio is, target): ratios of times measured in the same run.
TARGETS = (
    ("topk_gate", "fwd", "gemm+topk", "speedup over addmm + relu + torch.topk", ">= 1.3"),
    ("mxd_decode", "fwd", "gemm", "time / the z @ decoder GEMM alone", "<= 1.15"),
    ("train", "fwd+bwd", "reference", "speedup of forward + backward over the dense reference", ">= 4"),
)


def _row(rows: list[dict], op: str, mode: str, shape: str, provider: str):
    return next((r for r in rows if (r["op"], r["mode"], r["shape"], r["provider"]) == (op, mode, shape, provider)
                 and r.get("median")), None)


def _floor_time(row: dict):
    """The least time the row's work can take on this device: its FLOPs at the matmul ceiling or its
    compulsory bytes at the copy ceiling, whichever is longer (None without the fractions). A partial
    provider's bytes are its op's, not its own: its FLOPs alone."""
    keys = ("frac_matmul",) if row["provider"] in C.PARTIAL_PROVIDERS else ("frac_matmul", "frac_copy")
    fracs = [row.get(f) for f in keys if row.get(f) is not None]
    return max(fracs) * row["median"] if fracs and row.get("median") else None


def targets(rows: list[dict]) -> str:
    """Per shape, the ratios the kernels are held to: each mxd_fast backend against its baseline,
    plus, for the training step, the fraction of the matmul ceiling its sparse FLOPs reach, and the best
    ratio the device's ceilings allow (from the least floor time among the sparse providers, over the
    baseline's measured time; for the decode, whose time is set against a part of itself, over the
    GEMM's floor time)."""
    lines = []
    for op, mode, base, what, goal in TARGETS:
        shapes = list(dict.fromkeys(r["shape"] for r in rows if r["op"] == op and r["mode"] == mode))
        for shape in shapes:
            base_row = _row(rows, op, mode, shape, base)
            if base_row is None:
                continue
            b = base_row["median"]
            parts, floors = [], []
            for r in rows:
                if (r["op"], r["mode"], r["shape"]) != (op, mode, shape) or r["provider"] not in ("torch", "triton",
                                                                                               "cuda"):
                    continue
                if not r.get("median"):
                    continue
                ratio = r["median"] / b if base == "gemm" else b / r["median"]
                part = f"{r['provider']} {ratio:.2f}"
                if op == "train" and r.get("frac_matmul") is not None:
                    part += f" ({100 * r['frac_matmul']:.0f}% of the matmul ceiling)"
                parts.append(part)
                floor = _floor_time(r)
                if floor is not None:
                    floors.append(floor)
            if parts:
                line = f"{op} {mode} {shape}: {what} (target {goal}): " + ", ".join(parts)
                base_floor = _floor_time(base_row) if base == "gemm" else b
                if floors and base_floor:
                    best = min(floors) / base_floor if base == "gemm" else b / min(floors)
                    line += f"; at the ceilings {best:.2f}"
                lines.append(line)
    return "\n".join(lines)


def render(meta: dict, rows: list[dict]) -> str:
    """The text of table.txt: legend, table, training summary, targets, what was not run."""
    text = legend(meta) + "\n\n" + table(rows)
    for extra in (summary(rows), targets(rows)):
        if extra:
            text += "\n\n" + extra
    if meta.get("unavailable"):
        text += "\n\nnot run: " + "; ".join(f"{p}: {why}" for p, why in meta["unavailable"].items())
    return text


def write_json(path: str, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
        f.write("\n")


def plot(path: str, rows: list[dict]) -> str:
    """Speedup over the reference vs N and vs K (rows of the N and K sweeps; without sweeps, all rows
    against N). Returns a message; never raises when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib to get one)"
    panels = []
    for axis in ("N", "K"):
        sel = [r for r in rows if r.get("sweep") == axis and r.get("speedup_vs_reference")]
        if sel:
            panels.append((axis, sel))
    if not panels:
        sel = [r for r in rows if r.get("speedup_vs_reference") and r["op"] != "train"]
        if not sel:
            return "no speedups to plot"
        panels.append(("N", sel))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (axis, sel) in zip(axes[0], panels):
        series = defaultdict(list)
        for r in sel:
            if r["provider"] == "reference" or r["provider"] in C.PARTIAL_PROVIDERS:
                continue
            series[(r["op"], r["mode"], r["provider"])].append((r["dims"][axis], r["speedup_vs_reference"]))
        for (op, mode, provider), pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{op} {mode} [{provider}]")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xlabel(axis)
        ax.set_ylabel("speedup over the dense reference")
        ax.set_title(f"speedup vs {axis}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {os.path.relpath(path)}"


def main(argv=None) -> int:
    """Render a run's results.json again (e.g. after a change to the report): print the table, and
    write it and the plot where asked."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    p.add_argument("results", help="a results.json written by python -m bench")
    p.add_argument("--table", help="write the table to this file")
    p.add_argument("--plot", help="draw the plot to this PNG file")
    args = p.parse_args(argv)
    try:
        with open(args.results) as f:
            data = json.load(f)
        meta, rows = data["meta"], data["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"{args.results}: not a results file of python -m bench ({type(e).__name__}: {e})")
    text = render(meta, rows)
    print(text)
    if args.table:
        with open(args.table, "w") as f:
            f.write(text + "\n")
    if args.plot:
        print(plot(args.plot, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
