"""The trainer's lines of a GPU session (bench/gpu_session.sh, train stage), from the runs' metrics.json:

    python -m bench.train_summary WORK/train

- `make-train/`: the short default run (tokens/s, held-out NMSE, CE clean and spliced);
- `throughput-reference/` and `throughput-auto/`: the same K = 32 run with the dense reference layer and
  with the default (fast) backends; their tokens/s, with and without harvesting, and the ratio.
A run that is missing or failed is named. Writes `summary.json` beside the runs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

THROUGHPUT_RUNS = ("reference", "auto")


def _metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _number(m: dict, key: str) -> float:
    value = m.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def summarise(root: Path) -> dict:
    short = _metrics(root / "make-train")
    rates = {name: _metrics(root / f"throughput-{name}") for name in THROUGHPUT_RUNS}
    out = {"make_train": {k: short.get(k) for k in ("tokens", "tokens_per_s", "layer_tokens_per_s", "eval_nmse",
                                                    "ce_clean", "ce_spliced", "delta_ce", "layer", "k")},
           "throughput": {name: {k: m.get(k) for k in ("tokens", "tokens_per_s", "layer_tokens_per_s")}
                          for name, m in rates.items()}}
    for key in ("tokens_per_s", "layer_tokens_per_s"):
        out[f"auto_vs_reference_{key}"] = _number(rates["auto"], key) / _number(rates["reference"], key)
    return out


def lines(summary: dict) -> list[str]:
    short = summary["make_train"]
    text = []
    if short.get("tokens"):
        text.append(f"short default run (layer {short['layer']}, K = {short['k']}): {short['tokens']:,} tokens, "
                    f"{_number(short, 'tokens_per_s'):,.0f} tokens/s with harvesting, "
                    f"{_number(short, 'layer_tokens_per_s'):,.0f} in the layer; held-out NMSE {_number(short, 'eval_nmse'):.4f}, CE {_number(short, 'ce_clean'):.4f}"
                    f" -> {_number(short, 'ce_spliced'):.4f} spliced ({_number(short, 'delta_ce'):+.4f})")
    else:
        text.append("short default run: no metrics.json (failed or not run)")
    for name, m in summary["throughput"].items():
        if not m.get("tokens"):
            text.append(f"trainer throughput, {name} backend: no metrics.json (failed or not run)")
            continue
        text.append(f"trainer throughput, {name} backend: {_number(m, 'tokens_per_s'):,.0f} tokens/s with "
                    f"harvesting, {_number(m, 'layer_tokens_per_s'):,.0f} tokens/s in the layer ({m['tokens']:,} tokens)")
    text.append(f"default backends vs reference: {summary['auto_vs_reference_tokens_per_s']:.2f}x with harvesting, "
                f"{summary['auto_vs_reference_layer_tokens_per_s']:.2f}x in the layer")
    return text


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    summary = summarise(root)
    print("\n".join(lines(summary)))
    if root.is_dir():
        (root / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
