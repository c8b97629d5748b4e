"""The GPU targets the kernels are held to, as one table, from a GPU session's results (bench/gpu_session.sh):

    python -m bench.targets WORK        (WORK: the session's folder, holding bench-*/results.json and
                                         train/summary.json)

Each target is a ratio measured side by side in one run (bf16, 4096 tokens): the best mxd_fast backend
(cuda or triton) against its baseline, the layer's share of the run's matmul ceiling, Triton against CUDA,
and the trainer's throughput with the default backends against the dense reference layer. A target whose
rows are missing reads "not measured". Prints a Markdown table; exit status 0 whatever the verdicts."""
from __future__ import annotations

import glob
import json
import os
import sys
from typing import Callable, NamedTuple, Optional

FAST = ("cuda", "triton")


class Target(NamedTuple):
    name: str
    bar: str
    measure: Callable[[list, dict], Optional[float]]
    met: Callable[[float], bool]


LLAMA = ("llama-3.2-3b", "llama-3.2-3b:N=90088")   # N = 90088 is the shape's default; earlier runs named it


def _median(rows: list, op: str, mode: str, shape, provider: str) -> Optional[float]:
    """The least median of the rows of (op, mode, provider) at `shape` (a name, or a tuple of names)."""
    shapes = shape if isinstance(shape, tuple) else (shape,)
    found = [r["median"] for r in rows if (r["op"], r["mode"], r["provider"]) == (op, mode, provider)
             and r["shape"] in shapes and r.get("median")]
    return min(found) if found else None


def _best(rows, op, mode, shape) -> Optional[float]:
    times = [t for t in (_median(rows, op, mode, shape, p) for p in FAST) if t is not None]
    return min(times) if times else None


def _ratio(top: Optional[float], bottom: Optional[float]) -> Optional[float]:
    return top / bottom if top is not None and bottom else None


def _matmul_share(rows, shape) -> Optional[float]:
    shares = [r["frac_matmul"] for r in rows if (r["op"], r["mode"], r["shape"]) == ("train", "fwd+bwd", shape)
              and r["provider"] in FAST and r.get("frac_matmul") is not None]
    return max(shares) if shares else None


TARGETS = (
    Target("fused gate vs addmm + topk, Llama-3.2-3B width (N = 90088), K = 32", ">= 1.3x",
           lambda rows, _: _ratio(_median(rows, "topk_gate", "fwd", LLAMA, "gemm+topk"),
                                  _best(rows, "topk_gate", "fwd", LLAMA)), lambda v: v >= 1.3),
    Target("mxd_decode forward vs the z @ D GEMM alone, Pythia-1.4B, K = 32", "<= 1.15x",
           lambda rows, _: _ratio(_best(rows, "mxd_decode", "fwd", "pythia-1.4b"),
                                  _median(rows, "mxd_decode", "fwd", "pythia-1.4b", "gemm")), lambda v: v <= 1.15),
    Target("layer forward + backward vs the dense reference, Pythia-1.4B, K = 128", ">= 4x",
           lambda rows, _: _ratio(_median(rows, "train", "fwd+bwd", "pythia-1.4b:K=128", "reference"),
                                  _best(rows, "train", "fwd+bwd", "pythia-1.4b:K=128")), lambda v: v >= 4),
    Target("layer forward + backward, K = 32, share of the bf16 matmul ceiling in sparse FLOPs", ">= 60%",
           lambda rows, _: _matmul_share(rows, "pythia-1.4b"), lambda v: v >= 0.6),
    Target("Triton backend, layer forward + backward vs the CUDA backend (Pythia-1.4B, K = 32)", ">= 0.8x",
           lambda rows, _: _ratio(_median(rows, "train", "fwd+bwd", "pythia-1.4b", "cuda"),
                                  _median(rows, "train", "fwd+bwd", "pythia-1.4b", "triton")), lambda v: v >= 0.8),
    Target("trainer tokens/s, default backends vs --backend reference", ">= 3x",
           lambda _, summary: summary.get("auto_vs_reference_tokens_per_s"), lambda v: v >= 3),
)


def load(work: str) -> tuple[list, dict]:
    """(every benchmark row of the session, the trainer's summary or {})."""
    rows = []
    for path in sorted(glob.glob(os.path.join(work, "bench-*", "results.json"))):
        with open(path) as f:
            rows += json.load(f)["rows"]
    summary_path = os.path.join(work, "train", "summary.json")
    summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
    return rows, summary


def table(rows: list, summary: dict) -> str:
    lines = ["| target | measured | bar | met |", "|---|---|---|---|"]
    for t in TARGETS:
        value = t.measure(rows, summary)
        if value is None or value != value:   # missing or NaN
            lines.append(f"| {t.name} | not measured | {t.bar} | - |")
            continue
        shown = f"{100 * value:.0f}%" if t.bar.endswith("%") else f"{value:.2f}x"
        lines.append(f"| {t.name} | {shown} | {t.bar} | {'yes' if t.met(value) else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print(table(*load(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
