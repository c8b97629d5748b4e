"""Run folders as the application tools (python -m mxd_fast.steer, python -m mxd_fast.inspect) read them: the
config (the model and block the layer replaces), the firing counts of training and the held-out text.

Errors name the command-line argument (`what`, e.g. RUN_FOLDER) and the folder."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .checkpoint import CONFIG_FILE, FIRING_FILE, LAYER_FILE, METRICS_FILE

HELD_OUT_FRACTION = 0.02   # the trainer's share of held-out documents (mxd_fast.train.trainer)


@dataclass
class RunFolder:
    """What a run folder says about its layer: `model` None means the embedded SmolLM2-135M."""
    folder: Path
    config: dict
    model: Optional[str]
    layer_index: int
    arch: str
    size: int

    @property
    def label(self) -> str:
        return f"{self.arch} ({self.folder})"


def read_run_folder(path, what: str = "RUN_FOLDER") -> RunFolder:
    """The run folder at `path`, refused by name when it is missing, incomplete or does not say the model's
    block its layer replaces."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {path}: no run folder there")
    if not (folder / LAYER_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{what} {path}: not a run folder (it needs {LAYER_FILE} and {CONFIG_FILE})")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except ValueError as err:
        raise ValueError(f"{what} {path}: {CONFIG_FILE} is not JSON ({err})") from None
    model = config.get("model") if isinstance(config, dict) else None
    layer = config.get("layer") if isinstance(config, dict) else None
    if not isinstance(model, dict) or isinstance(model.get("layer"), bool) or not isinstance(model.get("layer"), int):
        raise ValueError(f"{what} {path}: {CONFIG_FILE} does not say which block's MLP the layer replaces "
                         "(model.layer)")
    if not isinstance(layer, dict) or not isinstance(layer.get("arch"), str) or not isinstance(layer.get("size"), int):
        raise ValueError(f"{what} {path}: {CONFIG_FILE} does not describe a layer (layer.arch, layer.size)")
    name = model.get("name")
    if isinstance(name, str) and name.startswith("embedded:"):
        name = None                                    # the trainer's name for the embedded model
    return RunFolder(folder, config, name, model["layer"], layer["arch"], layer["size"])


def agreed_model_and_layer(runs: Sequence[RunFolder], what: str = "RUN_FOLDER") -> tuple[Optional[str], int]:
    """(model, block) that every run was trained on; ValueError naming two runs that differ."""
    first = runs[0]
    for other in runs[1:]:
        for key, a, b in (("model", first.model, other.model), ("layer", first.layer_index, other.layer_index)):
            if a != b:
                show = (lambda v: "the embedded model" if v is None else v) if key == "model" else str
                raise ValueError(f"{what}: {first.folder} ({key} {show(a)}) and {other.folder} ({key} {show(b)}) "
                                 f"come from different {key}s: compare layers trained on the same model and layer")
    return first.model, first.layer_index


def firing_counts(run: RunFolder, what: str = "RUN_FOLDER") -> Optional[torch.Tensor]:
    """The training firing counts [size] (int64) of firing_counts.pt, or None when the run has none."""
    path = run.folder / FIRING_FILE
    if not path.is_file():
        return None
    try:
        counts = torch.load(path, map_location="cpu", weights_only=True)["firing_counts"]
    except Exception as err:   # a truncated or foreign file: say which
        raise ValueError(f"{what} {run.folder}: {FIRING_FILE} cannot be read ({type(err).__name__}: {err})") from None
    if not isinstance(counts, torch.Tensor) or counts.shape != (run.size,):
        raise ValueError(f"{what} {run.folder}: {FIRING_FILE} does not hold {run.size} counts, one per expert")
    return counts.to(torch.int64)


def trained_tokens(run: RunFolder) -> Optional[int]:
    """The tokens the run trained on (metrics.json), or None."""
    try:
        return int(json.loads((run.folder / METRICS_FILE).read_text())["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def context_length(run: RunFolder, default: int = 128) -> int:
    """The context length the run trained with."""
    value = run.config.get("train", {}).get("context") if isinstance(run.config.get("train"), dict) else None
    return value if isinstance(value, int) and value >= 2 else default


def _run_text(paths: Sequence[str], train: dict) -> tuple:
    """(documents, description) of the run's --text or --eval-text, read as the trainer read them: text
    files, or a datasets dataset (as a stream) under the run's --text-format, --text-column and --text-split."""
    from .corpus import read_text
    return read_text(paths, train.get("text_format") or "auto", train.get("text_column") or "text",
                     train.get("text_split") or "train")


def held_out_documents(run: RunFolder, text: Optional[Sequence[str]], option: str = "--text",
                       log: Callable[[str], None] = print) -> tuple[list, str]:
    """(documents, description): `text` (files or folders) when given, else the run's own held-out documents:
    its --eval-text, or the documents of its --text (or of the default corpus) the trainer held out."""
    from . import data as D
    if text:
        try:
            docs = D.read_documents(text)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"{option}: {err}") from None
        if not docs:
            raise ValueError(f"{option}: no documents in {' '.join(text)}")
        return docs, " ".join(text)
    train = run.config.get("train") if isinstance(run.config.get("train"), dict) else {}
    try:
        if train.get("eval_text"):
            return _run_text(train["eval_text"], train)
        docs, corpus = _run_text(train["text"], train) if train.get("text") else D.default_corpus(log)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{run.folder}: the run's held-out text cannot be read ({err}): pass {option} "
                                "FILES") from None
    held = D.split_documents(docs, HELD_OUT_FRACTION)[1]
    if isinstance(held, list) and not held:
        raise ValueError(f"{run.folder}: the run's corpus has no held-out document: pass {option} FILES")
    return held, f"the held-out documents of {corpus}"


def final_norm(model: nn.Module) -> nn.Module:
    """The norm the model applies before its unembedding (Llama: model.norm, GPT-2: ln_f, GPT-NeoX:
    final_layer_norm)."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm"):
        module = getattr(base, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"the model ({type(model).__name__}) has no final norm named norm, ln_f or final_layer_norm: "
                     "the tokens its layers promote cannot be read")
