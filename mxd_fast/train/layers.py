"""The layers the trainer builds (MxD, TopK transcoder, skip-transcoder) and their sizes at a parameter budget."""
from __future__ import annotations

from torch import nn

from ..module import MxD
from ..transcoder import TopKTranscoder

ARCHS = ("mxd", "transcoder", "skip-transcoder")


def budget_parameters(d_in: int, d_out: int, width: int) -> int:
    """Parameters of a TopK transcoder of `width` latents (encoder + bias, decoder + bias)."""
    return d_in * width + width + width * d_out + d_out


def _fixed_and_per_unit(arch: str, d_in: int, d_hidden: int, d_out: int, activation: str,
                        glu: bool) -> tuple[int, int]:
    """(parameters independent of the number of experts / latents, parameters per expert / latent)."""
    per = d_in + 1 + d_out
    if arch == "mxd":
        total = MxD(d_in, d_hidden, d_out, 1, 1, activation=activation, glu=glu, device="meta").num_parameters()
        return total - per, per
    if arch == "transcoder":
        return d_out, per
    if arch == "skip-transcoder":
        return d_out + d_in * d_out, per
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def size_for_budget(arch: str, transcoder_width: int, d_in: int, d_hidden: int, d_out: int,
                    activation: str = "gelu", glu: bool = False, k: int = 1) -> int:
    """Experts (mxd) or latents (transcoders) such that the layer has about the parameters of a TopK
    transcoder of `transcoder_width` latents (at most that many)."""
    fixed, per = _fixed_and_per_unit(arch, d_in, d_hidden, d_out, activation, glu)
    n = (budget_parameters(d_in, d_out, transcoder_width) - fixed) // per
    if n < k:
        raise ValueError(f"a budget of a width-{transcoder_width} transcoder leaves {max(n, 0)} "
                         f"{unit_name(arch)} for {arch}, fewer than k = {k}: raise --budget")
    return int(n)


def unit_name(arch: str) -> str:
    """What the layer's units are called: experts (mxd) or latents (transcoders)."""
    return "experts" if arch == "mxd" else "latents"


def build_layer(arch: str, d_in: int, d_out: int, k: int, size: int, d_hidden: int = 0, activation: str = "gelu",
                glu: bool = False, device=None, dtype=None, skip: bool = False) -> nn.Module:
    """An MxD (size = experts; skip: its optional linear skip path) or a TopKTranscoder (size = width;
    skip for skip-transcoder)."""
    if arch == "mxd":
        return MxD(d_in, d_hidden, d_out, size, k, activation=activation, glu=glu, skip=skip, device=device,
                   dtype=dtype)
    if arch in ("transcoder", "skip-transcoder"):
        return TopKTranscoder(d_in, size, d_out, k, skip=arch == "skip-transcoder", device=device, dtype=dtype)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def unwrapped(layer):
    """The module inside torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        if isinstance(getattr(layer, "_orig_mod", None), nn.Module):   # torch.compile's OptimizedModule
            layer = layer._orig_mod
        elif isinstance(layer, nn.parallel.DistributedDataParallel):
            layer = layer.module
        else:
            return layer
