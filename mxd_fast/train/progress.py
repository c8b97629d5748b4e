"""What the trainer prints: log lines (rank 0 only) and tqdm progress bars (when tqdm is installed)."""
from __future__ import annotations

import sys
from typing import Callable, Optional


class Log:
    """print() on rank 0, through the progress bar shown at the moment (so that it stays at the bottom)."""

    def __init__(self, rank: int, quiet: bool):
        self.rank, self.quiet, self.bar = rank, quiet, None

    def __call__(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    @property
    def shows_bars(self) -> bool:
        return self.rank == 0 and not self.quiet


def progress_bar(total: int, enabled: bool, initial: int = 0, unit: str = "step", desc: Optional[str] = None,
                 unit_scale: bool = False, eta: Optional[Callable[[], Optional[float]]] = None):
    """A tqdm bar on stdout, or None (disabled, or tqdm not installed). Its time estimate is eta() seconds
    when given and not None; else it comes from the average rate since the bar started (smoothing 0, not
    tqdm's moving average, which swings between fast steps and the pauses of harvesting)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None

    class Bar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            seconds = eta() if eta is not None else None
            left = d["total"] - d["n"] if d["total"] else 0
            if seconds is not None and seconds > 0 and left > 0:
                d["rate"] = left / seconds   # tqdm shows (total - n) / rate as the time left
            return d

    # with eta, the rate tqdm would show is the time left spread over the steps left: not shown
    bar_format = None if eta is None else "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
    return Bar(total=total, initial=initial, unit=unit, desc=desc, unit_scale=unit_scale, smoothing=0,
               bar_format=bar_format, dynamic_ncols=True, file=sys.stdout)


def training_eta(steps_left: int, step_seconds: float, rows_to_harvest: int, harvest_seconds_per_row: float) -> float:
    """Seconds the training has left: its steps, and the harvesting of the rows they will take from the
    model (ActivationBuffer.rows_to_harvest). Harvesting runs every few steps, as long as many steps;
    counted from the start, the estimate does not jump when it runs."""
    return steps_left * step_seconds + rows_to_harvest * harvest_seconds_per_row


class HarvestBar:
    """The progress callback of ActivationBuffer.fill / prepare: a bar of the rows harvested, shown from the
    first harvesting pass on and closed by close() (a context manager)."""

    def __init__(self, log: Log, desc: str = "harvesting activations"):
        self.log, self.desc, self.bar, self.started = log, desc, None, False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.started = True
            self.bar = progress_bar(total, self.log.shows_bars, unit="token", desc=self.desc, unit_scale=True)
            self.log.bar = self.bar
        if self.bar is not None:
            self.bar.update(min(done, total) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.log.bar = self.bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
