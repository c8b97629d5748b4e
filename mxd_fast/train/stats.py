"""What a run measures: expert firing counts, the sums behind each logged window, the training curve plot
and the end-of-run summary."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import atomic_write

ARCH_NAMES = {"mxd": "MxD", "transcoder": "TopK transcoder", "skip-transcoder": "TopK skip-transcoder"}


class FiringStats:
    """Expert (latent) firing counts from the selected indices with bincount (never a dense [B, N]
    tensor): frequencies per logging window and the tokens seen since each expert last fired."""

    def __init__(self, n: int, device="cpu"):
        self.n = n
        self.window = torch.zeros(n, dtype=torch.int64, device=device)
        self.total = torch.zeros(n, dtype=torch.int64, device=device)
        self.last_fired = torch.zeros(n, dtype=torch.int64, device=device)
        self.window_tokens = 0

    def update(self, values: Tensor, indices: Tensor) -> None:
        active = indices[values > 0]
        self.window += torch.bincount(active.reshape(-1), minlength=self.n)
        self.window_tokens += values.shape[0]

    def close_window(self, tokens_seen: int) -> dict:
        """Fold the window into the totals (after summing across ranks) and summarise it."""
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([self.window, torch.tensor([self.window_tokens], device=self.window.device)])
            dist.all_reduce(packed)
            self.window, self.window_tokens = packed[:-1].clone(), int(packed[-1])
        freq = self.window.double() / max(self.window_tokens, 1)
        self.total += self.window
        self.last_fired[self.window > 0] = tokens_seen
        summary = {"freq_max": float(freq.max()) if self.n else 0.0,
                   "freq_median": float(freq.median()) if self.n else 0.0,
                   "fired_in_window": float((self.window > 0).double().mean()) if self.n else 0.0}
        self.window.zero_()
        self.window_tokens = 0
        return summary

    def dead_fraction(self, tokens_seen: int, window: int) -> float:
        """Fraction of experts that did not fire in the last min(window, tokens_seen) tokens."""
        horizon = tokens_seen - min(window, tokens_seen)
        return float((self.last_fired <= horizon).double().mean()) if tokens_seen else 0.0

    def state_dict(self) -> dict:
        return {"total": self.total.cpu(), "last_fired": self.last_fired.cpu(), "window": self.window.cpu(),
                "window_tokens": self.window_tokens}

    def load_state_dict(self, state: dict) -> None:
        for name in ("total", "last_fired", "window"):
            getattr(self, name).copy_(state[name])
        self.window_tokens = int(state["window_tokens"])


class WindowSums:
    """Sums over the steps of one logging window: the loss (in the units of the unscaled y), the squared
    error and squared norm of y (for the NMSE), the active experts per token (l0) and the steps."""

    KEYS = ("loss", "err", "energy", "l0", "n")

    def __init__(self, state: Optional[dict] = None):
        self.sums = dict(state) if state is not None else dict.fromkeys(self.KEYS, 0.0)

    @torch.no_grad()
    def add(self, loss: Tensor, y_hat: Tensor, y: Tensor, values: Tensor, y_scale: float) -> None:
        self.sums["loss"] += float(loss) / y_scale
        self.sums["err"] += float(((y_hat.float() - y) ** 2).sum())
        self.sums["energy"] += float((y ** 2).sum())
        self.sums["l0"] += float((values > 0).sum()) / values.shape[0]
        self.sums["n"] += 1

    def close(self, device, world: int) -> dict:
        """loss, nmse and l0 of the window (summed over the ranks first); the sums start again at zero."""
        packed = torch.tensor([self.sums[k] for k in self.KEYS], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(packed)
        self.sums = dict.fromkeys(self.sums, 0.0)
        return {"loss": float(packed[0] / packed[4]), "nmse": float(packed[1] / packed[2]),
                "l0": float(packed[3] / packed[4])}

    def state_dict(self) -> dict:
        return dict(self.sums)


def _final_value(ax, x: float, y: float, fmt: str, below: bool = False) -> None:
    """Write the curve's last value next to its last point (below it when the point is near the top)."""
    color = ax.lines[-1].get_color()
    ax.plot([x], [y], "o", markersize=3, color=color)
    ax.annotate(fmt.format(y), xy=(x, y), xytext=(-4, -12 if below else 6), textcoords="offset points", ha="right",
                fontsize=9, color=color)


def _plain_ticks(ax) -> None:
    """Tick labels as plain numbers (0.02, not 2 x 10^-2; 250,000 tokens, not 2.5e5)."""
    from matplotlib.ticker import FuncFormatter
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_history(history: list, path: Path, title: str, units: str = "experts", dead_window: Optional[int] = None,
                 window_tokens: Optional[int] = None) -> bool:
    """training_curve.png (training_figure) written atomically. False if matplotlib is not installed or there
    is nothing to plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history:
        return False
    fig = training_figure(history, title, units, dead_window, window_tokens)
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)
    return True


def training_figure(history: list, title: str, units: str = "experts", dead_window: Optional[int] = None,
                    window_tokens: Optional[int] = None):
    """Loss, NMSE and expert use against the training tokens (a matplotlib figure): each curve's final value
    written at its end, and a caption saying what the expert curves count."""
    import matplotlib.pyplot as plt
    tokens = [h["tokens"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    for ax, key, name, ylabel in ((axes[0], "loss", "training loss", "mean over tokens of (ŷ − y)² / ‖y‖"),
                                  (axes[1], "nmse", "normalised MSE", "Σ ‖ŷ − y‖² / Σ ‖y‖²")):
        values = [h[key] for h in history]
        ax.plot(tokens, values)
        _final_value(ax, tokens[-1], values[-1], "{:.4g}")
        ax.set_yscale("log")
        ax.set_title(f"{name} (final {values[-1]:.4g})")
        ax.set_ylabel(f"{ylabel} (log scale)")
    ax = axes[2]
    for key, label in (("dead_fraction", "dead"), ("fired_in_window", "fired in window")):
        values = [h[key] for h in history]
        ax.plot(tokens, values, label=f"{label} (final {values[-1]:.3f})")
        _final_value(ax, tokens[-1], values[-1], "{:.3f}", below=values[-1] > 0.85)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="center right")
    ax.set_title(f"{units} in use")
    ax.set_ylabel(f"fraction of the {units}")
    for ax in axes:
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
        _plain_ticks(ax)
    fig.suptitle(title)
    fig.text(0.5, 0.01, _caption(units, dead_window, window_tokens), ha="center", va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def _caption(units: str, dead_window: Optional[int], window_tokens: Optional[int]) -> str:
    one = {"experts": "An expert", "latents": "A latent"}.get(units, f"A {units[:-1]}")
    dead = f"the last {dead_window:,} tokens" if dead_window else "the last --dead-window tokens"
    window = f" of {window_tokens:,} tokens (the last one may be shorter)" if window_tokens else ""
    return (f"{one} fires on a token when it is among the K selected for it with a positive weight.  "
            f"dead: fraction of the {units} that did not fire in {dead} (or since the start).\n"
            f"fired in window: fraction of the {units} that fired at least once in the logging window.  "
            f"Each point is one logging window{window}.")


def plot_title(arch: str, k: int, size: int, layer: int, model: str, tokens: int) -> str:
    units = "experts" if arch == "mxd" else "latents"
    return (f"{ARCH_NAMES.get(arch, arch)} (K = {k}, {size:,} {units}) replacing the MLP of layer {layer} of "
            f"{model}, {tokens:,} training tokens")


def summary(m: dict, out: Path, dead_window: Optional[int] = None) -> str:
    """The end-of-run lines: the run folder, the training and held-out metrics, and what l0, nmse, fvu and
    dead mean."""
    def f(key, fmt="{:.4f}"):
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
    lines = [f"run folder: {out}",
             f"  nmse {f('nmse')}  l0 {f('l0', '{:.1f}')}  dead {f('dead_fraction', '{:.3f}')}  "
             f"{f('tokens', '{:,}')} tokens at {f('tokens_per_s', '{:.0f}')} tok/s"]
    if "ce_clean" in m:
        lines.append(f"  CE clean {f('ce_clean')}  spliced {f('ce_spliced')} ({f('delta_ce', '{:+.4f}')})  "
                     f"zero-ablated {f('ce_zero_ablation')} ({f('delta_ce_zero_ablation', '{:+.4f}')})  "
                     f"CE recovered {f('ce_recovered', '{:.1%}')}  KL {f('kl_spliced')} "
                     f"(zero-ablated {f('kl_zero_ablation')})")
        lines.append(f"  held-out nmse {f('eval_nmse')}  fvu {f('eval_fvu')}  l0 {f('eval_l0', '{:.1f}')}")
    lines += _glossary(m, dead_window)
    return "\n".join(lines)


def _glossary(m: dict, dead_window: Optional[int]) -> list[str]:
    """What the summary's figures mean, each said once."""
    units = "experts" if m.get("arch", "mxd") == "mxd" else "latents"
    k = f"K = {m['k']}" if m.get("k") is not None else "K"
    dead = f"{dead_window:,}" if dead_window else "--dead-window"
    lines = [f"  l0: {units} active per token (at most {k}); dead: fraction of the {units} that did not fire in the "
             f"last {dead} tokens",
             "  nmse: sum ||y^ - y||^2 / sum ||y||^2 over the tokens, y the MLP's output and y^ the layer's"]
    if "ce_clean" in m:
        lines[-1] += "; fvu: the same over the variance of y (the fraction of variance unexplained)"
        lines.append("  CE: next-token cross-entropy (nats) on held-out text, of the model, with the layer spliced "
                     "in, and with the MLP zeroed; KL: from the model's next-token distribution")
    return lines
