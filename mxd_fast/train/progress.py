"""What the trainer prints: log lines (rank 0 only) and tqdm progress bars (when tqdm is installed)."""
from __future__ import annotations

import sys
from typing import Optional


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
                 unit_scale: bool = False):
    """A tqdm bar on stdout, or None (disabled, or tqdm not installed). Its rate, and so its time estimate,
    is the average since the bar started (smoothing 0): harvesting pauses the training steps every few steps,
    and tqdm's default moving average swings between the fast steps and the pauses."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, unit_scale=unit_scale, smoothing=0,
                dynamic_ncols=True, file=sys.stdout)


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
