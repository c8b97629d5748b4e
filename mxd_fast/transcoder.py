"""TopK transcoder (and skip-transcoder): the baseline MxD is compared with, built on the same ops.

y = gather_combine(W_dec, TopK(relu(x W_enc^T + b_enc))) + b_dec (+ x W_skip).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .hooks import HookPoint, coefficient_pair, hooked_call
from .hub import HubMixin
from .module import TopKGate, _allocating, _flag, _float_dtype, _input, _k_for, _parameter_shapes, _positive_int
from .ops.gather_combine import gather_combine


class TopKTranscoder(HubMixin, nn.Module):
    """A TopK transcoder of `width` latents, k active per token; with skip=True a skip-transcoder.

    Parameters: encoder (mxd_fast.TopKGate: W_enc [width, d_in], b_enc [width]), decoder (W_dec
    [width, d_out]), bias (b_dec [d_out]), skip (if skip: W_skip, no bias).
    Initialised like nn.Linear layers with zero biases: encoder weight uniform in +-1/sqrt(d_in),
    decoder uniform in +-1/sqrt(width) (a linear map from the width latents), b_enc and b_dec zero,
    and skip (if skip) zero.

    Hook points (mxd_fast.HookPoint): hook_latents (Coefficients(values, indices) of the selected
    latents; a replacement may hold any number of columns) and hook_out (the output y). The encoder is
    the fused top-k gate as a module: a forward hook on `encoder` fires and sees, and may replace,
    Coefficients(values, indices) before hook_latents. encode() and decode() pass through the same
    hooks as forward. A hook point or the encoder without hooks costs one Python call, and torch.compile
    sees hooks on them also when they are registered after compiling. mxd_fast.steer(layer, expert=n,
    scale=c) steers latent n through hook_latents.
    """

    def __init__(self, d_in: int, width: int, d_out: int, k: int, skip: bool = False, device=None, dtype=None):
        super().__init__()
        d_in, width, d_out = (_positive_int(name, value) for name, value in
                              (("d_in", d_in), ("width", width), ("d_out", d_out)))
        k = _k_for("width", width, k)
        skip = _flag("skip", skip)
        factory = {"device": device, "dtype": _float_dtype(dtype)}
        parameters = {"encoder.weight": ("width", "d_in"), "encoder.bias": ("width",),
                      "decoder": ("width", "d_out"), "bias": ("d_out",)}
        if skip:
            parameters["skip.weight"] = ("d_out", "d_in")
        shapes = _parameter_shapes("TopKTranscoder", {"d_in": d_in, "width": width, "d_out": d_out}, parameters,
                                   factory["dtype"])
        self.d_in, self.width, self.d_out = d_in, width, d_out
        with _allocating("TopKTranscoder", shapes, factory["dtype"], device):
            self.encoder = TopKGate(d_in, width, k, **factory)
            self.decoder = nn.Parameter(torch.empty(width, d_out, **factory))
            self.bias = nn.Parameter(torch.empty(d_out, **factory))
            self.skip = nn.Linear(d_in, d_out, bias=False, **factory) if skip else None
            self.reset_parameters()
        self.hook_latents, self.hook_out = HookPoint(), HookPoint()

    @property
    def k(self) -> int:
        """Latents active per token (the encoder's k)."""
        return self.encoder.k

    @k.setter
    def k(self, k: int) -> None:
        self.encoder.k = _k_for("width", self.width, k)

    def constructor_arguments(self) -> dict:
        """The arguments that rebuild this layer's architecture: type(self)(**layer.constructor_arguments())."""
        return {"d_in": self.d_in, "width": self.width, "d_out": self.d_out, "k": self.k,
                "skip": self.skip is not None}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        bound = 1.0 / math.sqrt(self.width)
        self.decoder.uniform_(-bound, bound)
        self.bias.zero_()
        if self.skip is not None:
            self.skip.weight.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, width={self.width}, d_out={self.d_out}, k={self.k}, skip={self.skip is not None}"

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(values, indices) of the selected latents, after the hooks on encoder and hook_latents."""
        _input(x, self.d_in)
        latents = hooked_call(self.hook_latents, hooked_call(self.encoder, x))
        return coefficient_pair("the hooks on encoder and hook_latents", latents)

    def decode(self, x: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        """y from encode()'s outputs, possibly edited (any number of latents); after hook_out."""
        y = gather_combine(self.decoder, values, indices)
        y = y + self.bias.to(y.dtype)   # under autocast y is in the autocast dtype: keep it, as nn.Linear does
        return hooked_call(self.hook_out, y if self.skip is None else y + self.skip(x))

    def forward(self, x: Tensor) -> Tensor:
        values, indices = self.encode(x)
        return self.decode(x, values, indices)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
