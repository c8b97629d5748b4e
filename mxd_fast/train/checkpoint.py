"""A run folder's files: their names, atomic writes (a reader never sees a partial file), and the per-rank
resume checkpoints with the checks that a resumed run continues the run that wrote them."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

LAYER_FILE, CONFIG_FILE, METRICS_FILE = "layer.safetensors", "config.json", "metrics.json"
HISTORY_FILE, FIRING_FILE, PLOT_FILE = "history.json", "firing_counts.pt", "training_curve.png"
CARD_FILE, CSV_FILE, TENSORBOARD_DIR = "README.md", "metrics.csv", "tensorboard"
TENSORBOARD_EVENTS = f"{TENSORBOARD_DIR}/events.out.tfevents.*"
RUN_FILES = (LAYER_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, FIRING_FILE, PLOT_FILE)
# What a run writes beside RUN_FILES: a run's only while the folder holds a run (a README.md or a CSV of
# the user's own, or a start that failed before its first checkpoint, is no run).
RUN_COMPANION_FILES = (CARD_FILE, CSV_FILE)
# Options a resumed run must share with the run that wrote its checkpoint.
RUN_OPTIONS = ("model", "layer", "arch", "k", "experts", "budget", "hidden", "activation", "glu", "batch", "lr",
               "warmup", "normalize", "dtype", "model_dtype", "context", "buffer", "harvest_contexts", "text", "eval_text",
               "text_format", "text_column", "text_split", "seed")


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write) -> None:
    """write(tmp_path) then os.replace(tmp_path, path): a reader never sees a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may create the file anew): a run's files are as readable as
        # open() makes them
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj, path) -> None:
    """torch.save through a temporary file in the same folder and os.replace."""
    atomic_write(Path(path), lambda p: torch.save(obj, p))


def write_json(path, obj, indent: Optional[int] = 2) -> None:
    """obj as JSON (and a newline) in `path`, atomically."""
    text = json.dumps(obj, indent=indent) + "\n"
    atomic_write(Path(path), lambda p: Path(p).write_text(text))


def run_files(out: Path) -> list:
    """The files of a run (finished or stopped) in the folder `out`: RUN_FILES and the checkpoints, and with
    them the model card, metrics.csv and TensorBoard's event files."""
    out = Path(out)
    if not out.is_dir():
        return []
    files = [out / n for n in RUN_FILES if (out / n).exists()] + list(out.glob("checkpoint-rank*.pt"))
    if files:
        files += [out / n for n in RUN_COMPANION_FILES if (out / n).exists()] + list(out.glob(TENSORBOARD_EVENTS))
    return sorted(files)


def checkpoint_path(out: Path, rank: int) -> Path:
    return Path(out) / f"checkpoint-rank{rank}.pt"


def refuse_other_options(resume_state: dict, args, ckpt_path: Path, world: int) -> None:
    """SystemExit if the checkpoint was trained with other RUN_OPTIONS or another layout of ranks."""
    sharded = world > 1 and args.parallel == "fsdp"
    saved = (resume_state.get("world", world), resume_state.get("fsdp", False))
    if saved != (world, sharded):
        raise SystemExit(f"--resume: {ckpt_path} was written by {saved[0]} rank(s)"
                         f"{' with --parallel fsdp' if saved[1] else ''}; resume the same way")
    before = resume_state.get("args", {})
    changed = [f"--{key.replace('_', '-')} {before[key]!r} -> {getattr(args, key)!r}"
               for key in RUN_OPTIONS if key in before and before[key] != getattr(args, key)
               and not (key == "layer" and args.layer is None)]   # the default layer: resolved later
    if changed:
        raise SystemExit(f"--resume: {ckpt_path} was trained with other options ({'; '.join(changed)}); "
                         "resume with the same ones (--tokens may grow)")


def finished_tokens(out: Path) -> Optional[int]:
    """The tokens of the finished run whose metrics.json is in `out` (None if there is none)."""
    try:
        return int(json.loads((Path(out) / METRICS_FILE).read_text())["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_resume_state(args, out: Path, ckpt_path: Path, steps: int, world: int, device) -> dict:
    """The checkpoint --resume continues from, once it is known to fit the options: SystemExit if there is
    none, if it was trained with other options, or if --tokens leaves it nothing (or less than nothing) to do."""
    if not ckpt_path.exists():
        raise SystemExit(f"--resume: no checkpoint {ckpt_path}")
    state = torch.load(ckpt_path, map_location=device, weights_only=False)
    refuse_other_options(state, args, ckpt_path, world)   # --layer is compared once it is resolved
    done = int(state["step"])
    if done > steps:
        raise SystemExit(f"--resume: {ckpt_path} is at step {done}, past the {steps} steps of --tokens "
                         f"{args.tokens}; --tokens may grow, not shrink")
    if done == steps and finished_tokens(out) == steps * args.batch:
        raise SystemExit(f"--resume: the run in {out} has finished its {steps} steps; raise --tokens to train "
                         "it further")
    return state
