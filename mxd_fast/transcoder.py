"""TopK transcoder (and skip-transcoder): the baseline MxD is compared with, built on the same ops.

y = gather_combine(W_dec, TopK(relu(x W_enc^T + b_enc))) + b_dec (+ x W_skip).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .module import _allocating, _flag, _float_dtype, _input, _parameter_shapes, _positive_int
from .ops.gather_combine import gather_combine
from .ops.topk_gate import topk_gate


class TopKTranscoder(nn.Module):
    """A TopK transcoder of `width` latents, k active per token; with skip=True a skip-transcoder."""

    def __init__(self, d_in: int, width: int, d_out: int, k: int, skip: bool = False, device=None, dtype=None):
        super().__init__()
        d_in, width, d_out, k = (_positive_int(name, value) for name, value in
                                 (("d_in", d_in), ("width", width), ("d_out", d_out), ("k", k)))
        if k > width:
            raise ValueError(f"k must satisfy 1 <= k <= width = {width}, got k = {k}")
        skip = _flag("skip", skip)
        factory = {"device": device, "dtype": _float_dtype(dtype)}
        parameters = {"encoder.weight": ("width", "d_in"), "encoder.bias": ("width",),
                      "decoder": ("width", "d_out"), "bias": ("d_out",)}
        if skip:
            parameters["skip.weight"] = ("d_out", "d_in")
        shapes = _parameter_shapes("TopKTranscoder", {"d_in": d_in, "width": width, "d_out": d_out}, parameters,
                                   factory["dtype"])
        self.d_in, self.width, self.d_out, self.k = d_in, width, d_out, k
        with _allocating("TopKTranscoder", shapes, factory["dtype"], device):
            self.encoder = nn.Linear(d_in, width, **factory)
            self.decoder = nn.Parameter(torch.empty(width, d_out, **factory))
            self.bias = nn.Parameter(torch.empty(d_out, **factory))
            self.skip = nn.Linear(d_in, d_out, bias=False, **factory) if skip else None
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        self.encoder.bias.zero_()
        bound = 1.0 / math.sqrt(self.width)
        self.decoder.uniform_(-bound, bound)
        self.bias.zero_()
        if self.skip is not None:
            self.skip.weight.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, width={self.width}, d_out={self.d_out}, k={self.k}, skip={self.skip is not None}"

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _input(x, self.d_in)
        return topk_gate(x, self.encoder.weight, self.encoder.bias, self.k)

    def decode(self, x: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        y = gather_combine(self.decoder, values, indices)
        y = y + self.bias.to(y.dtype)   # under autocast y is in the autocast dtype: keep it, as nn.Linear does
        return y if self.skip is None else y + self.skip(x)

    def forward(self, x: Tensor) -> Tensor:
        values, indices = self.encode(x)
        return self.decode(x, values, indices)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
