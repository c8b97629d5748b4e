"""The training curves where researchers look (--log): TensorBoard (RUN/tensorboard/, through torch's
SummaryWriter), Weights & Biases (wandb.init(dir=RUN); WANDB_MODE=offline writes the run under RUN/wandb/
without a network, for `wandb sync` later) and CSV (RUN/metrics.csv). Each logging window logs the values
of the trainer's history (WINDOW_KEYS) at its step; the end of the run logs the final metrics (those of
metrics.json that are numbers) as final/<name>. Only rank 0 logs.

tensorboard and wandb are imported only when their logger opens.
"""
from __future__ import annotations

import csv
import math
import numbers
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .checkpoint import CSV_FILE, TENSORBOARD_DIR
from .extras import MissingExtraError, missing_packages

LOGGERS = ("tensorboard", "wandb", "csv")
PIP_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}   # logger -> the package it imports
EXTRAS = {"tensorboard": "train", "wandb": "wandb"}                # logger -> the mxd_fast extra that has it
# what the trainer records per logging window (Trainer.log_window), in the CSV's column order
WINDOW_KEYS = ("step", "tokens", "loss", "nmse", "l0", "dead_fraction", "lr", "tokens_per_s", "freq_max",
               "freq_median", "fired_in_window")
DEFAULT_WANDB_PROJECT = "mxd_fast"


def parse_loggers(values: Optional[Iterable[str]]) -> list[str]:
    """The loggers of --log (given several times and/or comma-separated), each once, in the order given;
    ValueError naming --log for an unknown one."""
    chosen: list[str] = []
    for value in values or ():
        for name in (part.strip().lower() for part in value.split(",")):
            if name not in LOGGERS:
                raise ValueError(f"--log: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
            if name not in chosen:
                chosen.append(name)
    return chosen


def require_loggers(names: Sequence[str]) -> None:
    """MissingExtraError (one line naming the pip package) unless the packages of the chosen loggers import."""
    for name in names:
        package = PIP_PACKAGES.get(name)
        if package and missing_packages([package]):
            raise MissingExtraError(f"--log {name} needs the package {package}, not installed: pip install {package} "
                                    f"(or pip install 'mxd_fast[{EXTRAS[name]}]')", name=package)


def final_scalars(metrics: dict) -> dict:
    """The metrics that are finite numbers (not flags, not text, not None), as floats."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)}


class CsvLogger:
    """RUN/metrics.csv: a header, then one row per logging window. A resumed run writes the windows of its
    checkpoint's history again (no row of the steps it repeats) and appends its own."""

    def __init__(self, out: Path, history: Sequence[dict]):
        self.file = open(Path(out) / CSV_FILE, "w", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, WINDOW_KEYS, extrasaction="ignore", lineterminator="\n")
        self.writer.writeheader()
        self.writer.writerows(history)
        self.file.flush()

    def window(self, record: dict) -> None:
        self.writer.writerow(record)
        self.file.flush()

    def final(self, metrics: dict, step: int) -> None:
        """The final metrics are metrics.json's: the CSV keeps one row per window."""

    def close(self, failed: bool = False) -> None:
        self.file.close()


class TensorBoardLogger:
    """Scalars train/<key> per window and final/<name> at the end, at the step, under RUN/tensorboard/. A
    resumed run hides what the interrupted one logged past its checkpoint (SummaryWriter's purge_step)."""

    def __init__(self, out: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(out) / TENSORBOARD_DIR),
                                    purge_step=resume_step + 1 if resume_step else None)

    def window(self, record: dict) -> None:
        for key in WINDOW_KEYS[1:]:
            self.writer.add_scalar(f"train/{key}", record[key], global_step=record["step"])
        self.writer.flush()

    def final(self, metrics: dict, step: int) -> None:
        for key, value in final_scalars(metrics).items():
            self.writer.add_scalar(f"final/{key}", value, global_step=step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger:
    """A wandb run in RUN/wandb/ (online, or offline with WANDB_MODE=offline: wandb reads its environment):
    train/<key> per window at its step, final/<name> at the end (also in the run's summary). A resumed run
    continues the wandb run of its checkpoint (the same id)."""

    def __init__(self, out: Path, project: str, name: str, config: dict, run_id: Optional[str]):
        import wandb
        try:
            self.run = wandb.init(project=project, name=name, dir=str(out), config=config, id=run_id,
                                  resume="allow" if run_id else None)
        except Exception as err:   # no API key online, a bad project name, ...: wandb's own errors
            raise SystemExit(f"--log wandb: wandb.init failed ({type(err).__name__}: {err}); "
                             "WANDB_MODE=offline logs without a network or an account") from None
        self.run_id = self.run.id

    def window(self, record: dict) -> None:
        self.run.log({f"train/{key}": record[key] for key in WINDOW_KEYS[1:]}, step=record["step"])

    def final(self, metrics: dict, step: int) -> None:
        scalars = {f"final/{key}": value for key, value in final_scalars(metrics).items()}
        self.run.log(scalars, step=step)
        self.run.summary.update(scalars)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MetricLoggers:
    """The loggers of one run (none on ranks other than 0): window(record), final(metrics, step), close()."""

    def __init__(self, loggers: Sequence = ()):
        self.loggers = list(loggers)

    @classmethod
    def open(cls, names: Sequence[str], out: Path, *, history: Sequence[dict], resume_step: int, config: dict,
             wandb_project: Optional[str] = None, wandb_name: Optional[str] = None,
             wandb_id: Optional[str] = None) -> "MetricLoggers":
        opened = cls()
        try:
            for name in names:
                if name == "csv":
                    opened.loggers.append(CsvLogger(out, history))
                elif name == "tensorboard":
                    opened.loggers.append(TensorBoardLogger(out, resume_step))
                elif name == "wandb":
                    opened.loggers.append(WandbLogger(out, wandb_project or DEFAULT_WANDB_PROJECT,
                                                      wandb_name or Path(out).resolve().name, config, wandb_id))
        except BaseException:
            opened.close(failed=True)
            raise
        return opened

    @property
    def wandb_run_id(self) -> Optional[str]:
        return next((lg.run_id for lg in self.loggers if isinstance(lg, WandbLogger)), None)

    def window(self, record: dict) -> None:
        for logger in self.loggers:
            logger.window(record)

    def final(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.final(metrics, step)

    def close(self, failed: bool = False) -> None:
        """Close every logger once (a second call does nothing)."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close(failed)
