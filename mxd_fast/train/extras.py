"""The packages of the `train` extra and the one message that names them when they are missing."""
from __future__ import annotations

import importlib

from .._entry import INSTALL  # noqa: F401  (one spelling of the install command)
# What every training run needs (tqdm and matplotlib are optional: without them there is no progress bar
# and no training_curve.png); gguf only for a .gguf model, the embedded one included.
TRAIN_PACKAGES = ("transformers", "tokenizers", "safetensors", "huggingface_hub")
GGUF_PACKAGES = ("gguf",)


class MissingExtraError(ImportError):
    """A package of the `train` extra is not installed."""


def missing_packages(packages) -> list[str]:
    """The packages among `packages` that cannot be imported, each with the reason when it is not simply
    absent (an installed package that fails to import)."""
    missing = []
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(name if err.name == name else f"{name} ({err})")
    return missing


def require(*packages: str, what: str = "mxd_fast.train") -> None:
    """MissingExtraError, in one line naming `what` needs, the packages missing and the install command,
    unless every package imports."""
    missing = missing_packages(packages)
    if missing:
        raise MissingExtraError(f"{what} needs {', '.join(missing)}, not installed: {INSTALL}",
                                name=missing[0].split()[0])
