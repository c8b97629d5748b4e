"""A trained layer on disk, in a run folder: layer.safetensors (its tensors), config.json (what rebuilds it, and
the run's model, options and corpus) and README.md (a model card with the training metrics). The folder is in
the Hugging Face Hub format of mxd_fast.hub: it loads with load_layer(folder), mxd_fast.load_pretrained(folder)
or MxD.from_pretrained(folder), and uploaded as it is to a Hub model repo, with load_pretrained(repo_id).

Run folders written before the Hub format (a config.json of {"layer": ..., "model": ..., ...} only) load with
load_layer."""
from __future__ import annotations

import json
import numbers
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from .. import hub
from ..module import MxD, _float_dtype
from ..transcoder import TopKTranscoder
from .checkpoint import CARD_FILE, CONFIG_FILE, LAYER_FILE, atomic_write
from .extras import require
from .layers import build_layer, unwrapped


def layer_spec(layer: nn.Module) -> dict:
    """What build_layer needs to rebuild `layer` (also inside torch.compile's or DDP's wrapper)."""
    layer = unwrapped(layer)
    if isinstance(layer, MxD):
        return {"arch": "mxd", "d_in": layer.d_in, "d_out": layer.d_out, "k": layer.k, "size": layer.n_experts,
                "d_hidden": layer.d_hidden, "activation": layer.activation, "glu": layer.glu is not None,
                "skip": layer.skip is not None}
    if isinstance(layer, TopKTranscoder):
        return {"arch": "skip-transcoder" if layer.skip is not None else "transcoder", "d_in": layer.d_in,
                "d_out": layer.d_out, "k": layer.k, "size": layer.width}
    raise TypeError(f"cannot describe a {type(layer).__name__}")


def card_metrics(metrics: Optional[Mapping]) -> dict:
    """The metrics a model card shows: those that are numbers or text (None means "does not apply")."""
    return {key: value for key, value in (metrics or {}).items() if isinstance(value, (str, numbers.Real))}


def run_config(layer: nn.Module, extra: Optional[dict] = None) -> dict:
    """config.json of a run folder holding `layer`: the Hub config (weights: layer.safetensors) with "layer"
    (layer_spec) and the keys of `extra` about the run."""
    return hub.layer_config(layer, weights=LAYER_FILE, extra={"layer": layer_spec(layer), **(extra or {})})


def save_layer(layer: nn.Module, folder, extra: Optional[dict] = None, metrics: Optional[Mapping] = None) -> Path:
    """Write folder/layer.safetensors, folder/config.json (run_config: `extra` holds keys about the run, e.g.
    the model and layer it replaces) and folder/README.md (a model card showing `metrics`), each atomically."""
    require("safetensors", what="save_layer")
    from safetensors.torch import save_file
    layer = unwrapped(layer)
    config = run_config(layer, extra)   # before writing: only layers it can describe
    config_text = json.dumps(config, indent=2) + "\n"
    card = hub.model_card(layer, config, card_metrics(metrics))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in layer.state_dict().items()}
    atomic_write(folder / LAYER_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_FILE, lambda p: Path(p).write_text(config_text))
    atomic_write(folder / CARD_FILE, lambda p: Path(p).write_text(card))
    return folder


def save_model_card(layer: nn.Module, folder, metrics: Optional[Mapping] = None) -> Path:
    """Write folder/README.md again (atomically) for the layer save_layer wrote there, showing `metrics`."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    card = hub.model_card(unwrapped(layer), config, card_metrics(metrics))
    atomic_write(folder / CARD_FILE, lambda p: Path(p).write_text(card))
    return folder / CARD_FILE


def usable_device(device, what: str) -> torch.device:
    """torch.device(device) if tensors with data can live there, else ValueError beginning with `what`
    (how the caller names the argument)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{what}: {device!r} is not a device ({err})") from None
    if dev.type == "meta":
        raise ValueError(f"{what}: a meta tensor holds no data; use a real device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r}: no CUDA device is available (torch {torch.__version__}"
                             f"{', built without CUDA' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _run_folder(path: Path) -> Path:
    """The run folder of `path` (a run folder or its layer.safetensors), once it is known to hold a layer."""
    if not path.exists():
        raise FileNotFoundError(f"no run folder or {LAYER_FILE} at {path}")
    if not path.is_dir() and path.name != LAYER_FILE:
        raise ValueError(f"{path}: load_layer reads a run folder or its {LAYER_FILE}, not another file "
                         f"(it would return the folder's {LAYER_FILE})")
    folder = path if path.is_dir() else path.parent
    for name in (LAYER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a run folder: it has no {name}"
                                    + ("" if (folder / LAYER_FILE).exists() else " (training writes the layer at "
                                       "its end; a stopped run has only its checkpoint: --resume it)"))
    return folder


def load_layer(path, device="cpu", dtype=None) -> nn.Module:
    """The layer saved in a run folder (or its layer.safetensors), ready to use or to splice with
    `splice_layer(model, config['model']['layer'], layer)`: in the dtype it was saved in, unless
    `dtype` is given. Run folders of both layouts load: the Hub format's and the earlier one's."""
    require("safetensors", what="load_layer")
    device = usable_device(device, "device")
    _float_dtype(dtype)
    folder = _run_folder(Path(path))
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_FILE} does not describe a layer ({type(err).__name__}: {err})") from None
    if isinstance(config, dict) and "format" in config:
        return hub.load_folder(folder, device=device, dtype=dtype)
    return _load_earlier_layout(folder, config, device, dtype)


def _load_earlier_layout(folder: Path, config, device, dtype) -> nn.Module:
    """A run folder written before the Hub format: config.json's "layer" is the layer_spec."""
    from safetensors.torch import load_file
    try:
        spec = dict(config["layer"])
        layer = build_layer(spec.pop("arch"), **spec, device="meta")
    except (ValueError, KeyError, TypeError) as err:   # not a mapping, no arch, arguments build_layer refuses
        raise ValueError(f"{folder / CONFIG_FILE} does not describe a layer ({type(err).__name__}: {err})") from None
    state = load_file(str(folder / LAYER_FILE), device="cpu")
    layer.load_state_dict(state, assign=True)     # the saved tensors, dtypes included
    return layer.to(device=device, dtype=dtype)
