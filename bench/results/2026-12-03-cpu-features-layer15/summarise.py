"""Prints the tables of this folder's README from the probe and steer outputs of each seed."""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent
SEEDS = {"0": "", "1": "-seed1"}
FEATURES = ("mxd", "transcoder", "mlp_neurons", "residual")


def probing() -> None:
    print("| data set | features | " + " | ".join(f"k={k} seed {s}" for k in (1, 5) for s in SEEDS) + " |")
    print("|---|---|" + "---|" * (2 * len(SEEDS)))
    results = {s: json.loads((HERE / f"probe{suffix}" / "results.json").read_text()) for s, suffix in SEEDS.items()}
    for data in ("lang", "code", "topic", "mean"):
        for features in FEATURES:
            cells = []
            for k in ("1", "5"):
                for s in SEEDS:
                    acc = results[s]["accuracy"]
                    sets = ("lang", "code", "topic") if data == "mean" else (data,)
                    cells.append(f"{statistics.mean(acc[d][features]['mean'][k] for d in sets):.3f}")
            print(f"| {data} | {features} | " + " | ".join(cells) + " |")


def steering() -> None:
    print("| seed | layer | scale | baseline fluency | mean fluency change | baseline coherence | mean coherence "
          "change | share of experts raising coherence | concept rate (baseline) | share raising it |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, suffix in SEEDS.items():
        report = json.loads((HERE / f"steer{suffix}" / "steer.json").read_text())
        for run in report["runs"]:
            experts, summary, base = run["experts"], run["summary"], run["baseline"]
            raised = sum(e["coherence_change"] > 0 for e in experts) / len(experts)
            print(f"| {s} | {run['arch']} | {run['scale']:.0f} | {base['fluency']:.2f} | "
                  f"{summary['mean_fluency_change']:+.2f} | {base['coherence']:.3f} | "
                  f"{summary['mean_coherence_change']:+.3f} | {raised:.2f} | {summary['mean_concept_rate']:.3f} "
                  f"({summary['mean_baseline_concept_rate']:.3f}) | {summary['concept_rate_rose']:.2f} |")


if __name__ == "__main__":
    probing()
    print()
    steering()
