"""Hugging Face Hub format for the mxd_fast layers: a folder (or Hub model repo) holding config.json (the
constructor arguments and a format tag), model.safetensors (the state dict) and README.md (a model card).

A training run folder (mxd_fast.train) is such a folder too: its config.json names its weights file
("weights": "layer.safetensors") and lists the keys it adds about the run ("extra_keys": the model and
layer it replaces, the options, the corpus), which loading ignores; its README.md holds the training
metrics. It loads with load_pretrained(run_folder), also once uploaded to the Hub as it is.

safetensors (and, to download or upload, huggingface_hub) are imported only when a function here runs,
so `import mxd_fast` stays light.
"""
from __future__ import annotations

import importlib
import inspect
import json
import numbers
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
from torch import nn

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"
FORMAT, FORMAT_VERSION = "mxd_fast", 1
WEIGHTS_KEY, EXTRA_KEYS_KEY = "weights", "extra_keys"   # a run folder's weights file, and its keys about the run
_TAGS = ("format", "format_version", "class", "mxd_fast_version", "dtype", WEIGHTS_KEY, EXTRA_KEYS_KEY)
# a Hub repo id: "name" or "owner/name" (letters, digits, - _ .), as huggingface_hub validates it
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")


def _require(module: str):
    """The module `module`, or ImportError saying how to install its package."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"mxd_fast's Hub format needs {module.partition('.')[0]}: pip install 'mxd_fast[hub]' "
                          f"(or pip install safetensors huggingface_hub)") from err


def _version() -> str:
    from . import __version__
    return __version__


def _device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ({err})") from None
    if device.type == "meta":
        raise ValueError("device: a meta tensor holds no data; use a real device")
    return device


def _check_metrics(metrics) -> dict:
    """metrics as a dict of str -> number or str; TypeError naming the bad entry."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a mapping of names to numbers or strings, got {type(metrics).__name__}")
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metrics: names must be strings, got {key!r}")
        if not isinstance(value, (str, numbers.Real)):
            raise TypeError(f"metrics[{key!r}] must be a number or a string, got {type(value).__name__}")
    return dict(metrics)


def _cell(value) -> str:
    """value as a Markdown table cell: floats in their shortest exact form, '|' escaped."""
    text = repr(float(value)) if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) \
        else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _training_lines(config: dict) -> list:
    """What a training run's config says about where the layer comes from (nothing for other configs)."""
    model = config.get("model") if EXTRA_KEYS_KEY in config else None
    if not isinstance(model, dict) or "name" not in model:
        return []
    lines = ["", "## Training", "", f"Trained to replace the MLP of layer {model.get('layer')} of "
             f"`{model['name']}` with mxd_fast.train."]
    if isinstance(config.get("corpus"), str):
        lines += ["", f"Corpus: {config['corpus']}"]
    return lines


def _model_card(layer: nn.Module, config: dict, metrics: dict, repo_id: Optional[str]) -> str:
    """README.md for the folder: Hub metadata, the architecture, its sizes and the training metrics."""
    name = config["class"]
    if "n_experts" in config:
        summary = (f"A Mixture of Decoders (MxD) layer (Oldfield et al., 2025, arXiv:2505.21364): "
                   f"y = (a C) * (z D) + b with z = {config['activation']}(x E + b_e)"
                   f"{' * (x W_glu + b_glu)' if config.get('glu') else ''} and a = TopK_{config['k']}"
                   f"(relu(x G^T + b_g)): {config['n_experts']:,} full-rank experts, {config['k']} active per "
                   f"token{', plus a skip connection x W_skip' if config.get('skip') else ''}.")
    else:
        summary = (f"A TopK {'skip-' if config.get('skip') else ''}transcoder: y = TopK_{config['k']}"
                   f"(relu(x W_enc^T + b_enc)) W_dec + b_dec{' + x W_skip' if config.get('skip') else ''}, "
                   f"{config['width']:,} latents, {config['k']} active per token.")
    rows = [(arg, config[arg]) for arg in layer.constructor_arguments()]
    rows += [("parameters", f"{sum(p.numel() for p in layer.parameters()):,}"), ("dtype", config["dtype"]),
             ("mxd_fast version", config["mxd_fast_version"])]
    lines = ["---", "library_name: mxd_fast", "tags:", "- mxd_fast", "- interpretability",
             f"- {'mixture-of-decoders' if 'n_experts' in config else 'transcoder'}", "---", "",
             f"# mxd_fast.{name}", "", summary, "", "| | |", "|---|---|"]
    lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in rows]
    lines += _training_lines(config)
    if metrics:
        lines += ["", "## Training metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in metrics.items()]
    lines += ["", "## Usage", "", "```python", "import mxd_fast", "",
              f"layer = mxd_fast.load_pretrained({repo_id or 'path_to_this_folder'!r})", "```", ""]
    return "\n".join(lines)


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def layer_config(layer: nn.Module, weights: str = WEIGHTS_NAME, extra: Optional[Mapping] = None) -> dict:
    """config.json of `layer`: the format tags, the class, mxd_fast's version, the constructor arguments and
    the dtype; with `weights` (a file name other than model.safetensors) and `extra` (keys about where the
    layer comes from, listed under extra_keys and ignored when loading). ValueError for a layer on the meta
    device or an extra key the config has already."""
    state = layer.state_dict()
    if any(t.is_meta for t in state.values()):
        raise ValueError(f"{type(layer).__name__} is on the meta device: a meta tensor holds no data to save")
    dtypes = {t.dtype for t in state.values()}
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "class": type(layer).__name__,
              "mxd_fast_version": _version(), **layer.constructor_arguments(),
              "dtype": str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "mixed"}
    if weights != WEIGHTS_NAME:
        config[WEIGHTS_KEY] = _weights_name(weights, "weights")
    if extra:
        clash = sorted(set(extra) & (set(config) | set(_TAGS)))
        if clash:
            raise ValueError(f"extra: {', '.join(map(repr, clash))} {'is' if len(clash) == 1 else 'are'} the "
                             "layer's own config key(s)")
        config[EXTRA_KEYS_KEY] = sorted(extra)
        config.update(extra)
    return config


def model_card(layer: nn.Module, config: dict, metrics: Optional[Mapping] = None,
               repo_id: Optional[str] = None) -> str:
    """README.md of a folder holding `layer` with config.json `config` (layer_config's): the architecture, its
    sizes, where it was trained (a run's config) and `metrics` (names to numbers or strings)."""
    return _model_card(layer, config, _check_metrics(metrics), repo_id)


def _write_folder(layer: nn.Module, folder, metrics, repo_id: Optional[str] = None) -> Path:
    """config.json, model.safetensors and README.md of `layer` in `folder` (created if missing)."""
    safetensors_torch = _require("safetensors.torch")
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"save_directory must be a str or os.PathLike, got {type(folder).__name__}")
    metrics = _check_metrics(metrics)
    config = layer_config(layer)
    state = layer.state_dict()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    _write_atomically(folder / WEIGHTS_NAME, lambda p: safetensors_torch.save_file(tensors, str(p),
                                                                                  metadata={"format": "pt"}))
    _write_atomically(folder / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    _write_atomically(folder / CARD_NAME, lambda p: p.write_text(_model_card(layer, config, metrics, repo_id)))
    return folder


def _weights_name(name, where: str) -> str:
    """`name` if it is a .safetensors file name (no folder in it); ValueError naming `where` otherwise."""
    if not isinstance(name, str) or Path(name).name != name or name in (".", "..") or not name.endswith(
            ".safetensors"):
        raise ValueError(f"{where}: {name!r} is not the name of a .safetensors file in the folder")
    return name


def _resolve_folder(path, revision, token, cache_dir, local_files_only, patterns=None) -> Path:
    """The local folder `path`, or the snapshot of the Hub repo id `path` (downloaded if needed: its
    config.json, model.safetensors and README.md, or the files `patterns`)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder or a Hub repo id (str or os.PathLike), got {type(path).__name__}")
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise NotADirectoryError(f"{path}: expected a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}, got a file")
    text = os.fspath(path)
    if not _REPO_ID.match(text) or ".." in text or "--" in text or text.startswith(("~", ".")):
        raise FileNotFoundError(f"no folder {text!r} (and it is not a Hugging Face Hub repo id)")
    hub = _require("huggingface_hub")
    return Path(hub.snapshot_download(text, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, library_name="mxd_fast",
                                      library_version=_version(),
                                      allow_patterns=patterns or [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]))


def _read_config(folder: Path) -> dict:
    """config.json of an mxd_fast folder; errors name the file and what is wrong."""
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_NAME}: not a folder saved by save_pretrained")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / CONFIG_NAME} is not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        hint = (" (a training run folder of an earlier mxd_fast.train: load it with mxd_fast.train.load_layer)"
                if isinstance(config, dict) and "layer" in config and (folder / "layer.safetensors").is_file()
                else "")
        raise ValueError(f"{folder / CONFIG_NAME} is not an mxd_fast config (no \"format\": \"{FORMAT}\"){hint}")
    version = config.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_NAME}: format_version {version!r} is not one this mxd_fast "
                         f"({_version()}) reads (1 to {FORMAT_VERSION}); saved by mxd_fast "
                         f"{config.get('mxd_fast_version')}")
    _weights_name(config.get(WEIGHTS_KEY, WEIGHTS_NAME), f"{folder / CONFIG_NAME}: {WEIGHTS_KEY}")
    extra = config.get(EXTRA_KEYS_KEY, [])
    if not isinstance(extra, list) or not all(isinstance(key, str) for key in extra):
        raise ValueError(f"{folder / CONFIG_NAME}: {EXTRA_KEYS_KEY} must be a list of key names, got {extra!r}")
    return config


def _constructor_arguments(cls, config: dict, path: Path) -> dict:
    """The constructor arguments of `cls` in `config`; ValueError naming missing or unknown keys."""
    names = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "device", "dtype")]
    missing = [n for n in names if n not in config]
    unknown = sorted(set(config) - set(names) - set(_TAGS) - set(config.get(EXTRA_KEYS_KEY, ())))
    if missing or unknown:
        raise ValueError(f"{path}: {cls.__name__} " + "; ".join(
            part for part in (f"needs {', '.join(missing)}" if missing else "",
                              f"takes no {', '.join(unknown)}" if unknown else "") if part))
    return {n: config[n] for n in names}


def _load_tensors(layer: nn.Module, path: Path) -> dict:
    """The tensors of model.safetensors, checked against `layer`'s state dict (names, shapes, floating)."""
    safetensors = _require("safetensors")
    expected = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    what = f"{path} ({type(layer).__name__}({', '.join(f'{k}={v!r}' for k, v in layer.constructor_arguments().items())}))"
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as file:
            names = set(file.keys())
            missing, unexpected = sorted(set(expected) - names), sorted(names - set(expected))
            if missing or unexpected:
                raise ValueError(f"{what}: " + "; ".join(part for part in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"unexpected {', '.join(unexpected)}" if unexpected else "") if part))
            tensors = {}
            for name, shape in expected.items():
                got = tuple(file.get_slice(name).get_shape())
                if got != shape:
                    raise ValueError(f"{what}: {name} has shape {got}, the config's layer needs {shape}")
                tensors[name] = file.get_tensor(name)
                if not tensors[name].is_floating_point():
                    raise ValueError(f"{what}: {name} has dtype {tensors[name].dtype}, not a floating-point dtype")
    except safetensors.SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
    return tensors


def _load(cls, path, device, dtype, revision, token, cache_dir, local_files_only):
    """The layer in `path` (folder or Hub repo id); cls None: the class config.json names."""
    from .module import _float_dtype
    device, dtype = _device(device), _float_dtype(dtype)
    folder = _resolve_folder(path, revision, token, cache_dir, local_files_only)
    config = _read_config(folder)
    weights = config.get(WEIGHTS_KEY, WEIGHTS_NAME)
    if not (folder / weights).is_file() and not Path(path).expanduser().is_dir():   # a run folder on the Hub
        folder = _resolve_folder(path, revision, token, cache_dir, local_files_only, patterns=[weights])
    return load_folder(folder, cls, device, dtype, config)


def load_folder(folder, cls=None, device="cpu", dtype: Optional[torch.dtype] = None, config: Optional[dict] = None):
    """The layer in the local folder `folder` (save_pretrained's, or a training run's); cls None: the class
    its config.json names; `config`: that config.json, when the caller has read it."""
    from .module import MxD, _float_dtype
    from .transcoder import TopKTranscoder
    device, dtype, folder = _device(device), _float_dtype(dtype), Path(folder)
    config = _read_config(folder) if config is None else config
    weights = folder / config.get(WEIGHTS_KEY, WEIGHTS_NAME)
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} holds no {weights.name}: not a folder saved by save_pretrained")
    classes = {c.__name__: c for c in (MxD, TopKTranscoder)}
    if cls is None:
        if config.get("class") not in classes:
            raise ValueError(f"{folder / CONFIG_NAME}: class {config.get('class')!r} is not one of {sorted(classes)}")
        cls = classes[config["class"]]
    elif config.get("class") != cls.__name__:
        raise ValueError(f"{folder / CONFIG_NAME} holds a {config.get('class')}, not a {cls.__name__}: load it "
                         f"with mxd_fast.load_pretrained")
    arguments = _constructor_arguments(cls, config, folder / CONFIG_NAME)
    try:
        layer = cls(**arguments, device="meta")
    except (TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_NAME}: {err}") from err
    layer.load_state_dict(_load_tensors(layer, weights), assign=True)
    return layer.to(device=device, dtype=dtype)


def load_pretrained(path, device="cpu", dtype: Optional[torch.dtype] = None, *, revision: Optional[str] = None,
                    token=None, cache_dir=None, local_files_only: bool = False) -> nn.Module:
    """The mxd_fast layer (MxD or TopKTranscoder, as its config.json says) saved by save_pretrained in the
    folder `path`, or in the Hugging Face Hub model repo `path` (downloaded with huggingface_hub's
    snapshot_download; revision, token, cache_dir and local_files_only are passed to it). On `device`, in
    the saved dtype unless `dtype` is given."""
    return _load(None, path, device, dtype, revision, token, cache_dir, local_files_only)


class HubMixin:
    """save_pretrained / from_pretrained / push_to_hub in the Hugging Face Hub layout (config.json,
    model.safetensors, README.md). The class provides constructor_arguments()."""

    def save_pretrained(self, save_directory, metrics: Optional[Mapping] = None) -> Path:
        """Write config.json (the constructor arguments, the class, the format and mxd_fast's version),
        model.safetensors and README.md (a model card: architecture, sizes and `metrics`, a mapping of
        names to numbers or strings, if given) into `save_directory`, created if missing; files there of
        the same names are replaced. Returns the folder."""
        return _write_folder(self, save_directory, metrics)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype: Optional[torch.dtype] = None, *,
                        revision: Optional[str] = None, token=None, cache_dir=None, local_files_only: bool = False):
        """The layer saved by save_pretrained in the folder `path`, or in the Hub model repo `path`
        (see mxd_fast.load_pretrained); ValueError when config.json holds another class."""
        return _load(cls, path, device, dtype, revision, token, cache_dir, local_files_only)

    def push_to_hub(self, repo_id: str, metrics: Optional[Mapping] = None, *, private: Optional[bool] = None,
                    token=None, revision: Optional[str] = None, commit_message: Optional[str] = None):
        """Upload the save_pretrained folder to the Hub model repo `repo_id` (created if missing) with
        huggingface_hub's upload_folder; returns its commit info."""
        if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
            raise ValueError(f"repo_id must be a Hub repo id such as 'owner/name', got {repo_id!r}")
        hub = _require("huggingface_hub")
        with tempfile.TemporaryDirectory() as folder:
            _write_folder(self, folder, metrics, repo_id=repo_id)
            hub.create_repo(repo_id, token=token, private=private, exist_ok=True)
            return hub.upload_folder(repo_id=repo_id, folder_path=folder, token=token, revision=revision,
                                     commit_message=commit_message or f"Upload mxd_fast.{type(self).__name__}")
