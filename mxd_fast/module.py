"""The MxD layer: y = (a C) * (z D) + b, with z = phi(x E + b_e) and a = TopK(relu(x G^T + b_g))."""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import check_tensor
from .ops.mxd_decode import mxd_decode
from .ops.topk_gate import topk_gate

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _float_dtype(dtype):
    """dtype if it is None or a floating-point torch.dtype."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    return dtype


_MAX_BYTES = 2 ** 63 - 1   # the most bytes torch lets one tensor's storage have (int64)


def _parameter_shapes(owner: str, dims: dict, parameters: dict, dtype) -> dict:
    """{"name [arg = size, ...]": shape} of the parameters {name: (arg, ...)}, sizes from `dims`; ValueError
    naming the arguments when a parameter is larger than a torch tensor can be. Allocates nothing."""
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    shapes = {}
    for name, args in parameters.items():
        what = f"{name} [{', '.join(f'{arg} = {dims[arg]}' for arg in args)}]"
        shapes[what] = tuple(dims[arg] for arg in args)
        numel = math.prod(shapes[what])
        if numel * itemsize > _MAX_BYTES:
            raise ValueError(f"{owner}: {what} would have {numel:,} elements ({numel * itemsize:,} bytes), more "
                             f"than a torch tensor can hold ({_MAX_BYTES:,} bytes)")
    return shapes


@contextlib.contextmanager
def _allocating(owner: str, shapes: dict, dtype, device):
    """Re-raises an allocation failure (out of memory, ...) while creating the parameters `shapes`, naming
    the bytes they need and the arguments that size the largest; the original error is chained."""
    try:
        yield
    except RuntimeError as err:
        if type(err) not in (RuntimeError, torch.OutOfMemoryError):   # not the allocator's
            raise
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        largest = max(shapes, key=lambda what: math.prod(shapes[what]))
        total = sum(math.prod(shape) for shape in shapes.values()) * itemsize
        raise type(err)(f"{owner}: could not allocate its parameters, {total:,} bytes in all on device "
                        f"{device if device is not None else '(the default)'} (the largest, {largest}, "
                        f"{math.prod(shapes[largest]) * itemsize:,} bytes): {err}") from err


def _input(x, d_in: int) -> Tensor:
    """x: a tensor [..., d_in]."""
    check_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in = {d_in}, got shape {tuple(x.shape)}")
    return x


class MxD(nn.Module):
    """Mixture of Decoders: n_experts full-rank linear experts W_n = D diag(c_n), k active per token,
    never materialised.

    Parameters: encoder (E, b_e), glu (if glu), gate (G, b_g), experts (C: [n_experts, d_out]),
    decoder (D: [d_hidden, d_out]), bias (b: [d_out]), skip (if skip, no bias).
    Initialised as in the paper: gate like nn.Linear with zero bias, expert rows uniform in [-1, 1]
    scaled to unit norm, decoder, bias and skip zero (the layer starts at y = 0).

    Hooks: encode() reads gate.weight and gate.bias directly (the fused top-k gate, topk_gate) and never
    calls the `gate` module, so a forward hook on `layer.gate` does not fire. To see the gate's output,
    call encode(x) (values and indices: the k selected experts' coefficients) or hook the layer itself.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_experts: int, k: int, activation: str = "gelu",
                 glu: bool = False, skip: bool = False, device=None, dtype=None):
        super().__init__()
        d_in, d_hidden, d_out, n_experts, k = (
            _positive_int(name, value) for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out),
                                                           ("n_experts", n_experts), ("k", k)))
        if k > n_experts:
            raise ValueError(f"k must satisfy 1 <= k <= n_experts = {n_experts}, got k = {k}")
        if not isinstance(activation, str) or activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        glu, skip = _flag("glu", glu), _flag("skip", skip)
        factory = {"device": device, "dtype": _float_dtype(dtype)}
        dims = {"d_in": d_in, "d_hidden": d_hidden, "d_out": d_out, "n_experts": n_experts}
        parameters = {"encoder.weight": ("d_hidden", "d_in"), "encoder.bias": ("d_hidden",),
                      "gate.weight": ("n_experts", "d_in"), "gate.bias": ("n_experts",),
                      "experts": ("n_experts", "d_out"), "decoder": ("d_hidden", "d_out"), "bias": ("d_out",)}
        if glu:
            parameters.update({"glu.weight": ("d_hidden", "d_in"), "glu.bias": ("d_hidden",)})
        if skip:
            parameters["skip.weight"] = ("d_out", "d_in")
        shapes = _parameter_shapes("MxD", dims, parameters, factory["dtype"])
        self.d_in, self.d_hidden, self.d_out, self.n_experts, self.k = d_in, d_hidden, d_out, n_experts, k
        self.activation = activation
        with _allocating("MxD", shapes, factory["dtype"], device):
            self.encoder = nn.Linear(d_in, d_hidden, **factory)
            self.glu = nn.Linear(d_in, d_hidden, **factory) if glu else None
            self.gate = nn.Linear(d_in, n_experts, **factory)
            self.experts = nn.Parameter(torch.empty(n_experts, d_out, **factory))
            self.decoder = nn.Parameter(torch.empty(d_hidden, d_out, **factory))
            self.bias = nn.Parameter(torch.empty(d_out, **factory))
            self.skip = nn.Linear(d_in, d_out, bias=False, **factory) if skip else None
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.encoder.reset_parameters()
        if self.glu is not None:
            self.glu.reset_parameters()
        self.gate.reset_parameters()
        self.gate.bias.zero_()
        self.experts.uniform_(-1.0, 1.0)
        self.normalize_experts()
        self.decoder.zero_()
        self.bias.zero_()
        if self.skip is not None:
            self.skip.weight.zero_()

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_hidden={self.d_hidden}, d_out={self.d_out}, n_experts={self.n_experts}, "
                f"k={self.k}, activation={self.activation!r}, glu={self.glu is not None}, "
                f"skip={self.skip is not None}")

    def hidden(self, x: Tensor) -> Tensor:
        """z = phi(x E + b_e), times (x W_glu + b_glu) in the GLU variant."""
        z = ACTIVATIONS[self.activation](self.encoder(x))
        return z if self.glu is None else z * self.glu(x)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, values, indices): the dense hidden state and the k selected experts' coefficients."""
        _input(x, self.d_in)
        values, indices = topk_gate(x, self.gate.weight, self.gate.bias, self.k)
        return self.hidden(x), values, indices

    def decode(self, x: Tensor, z: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        """y from encode()'s outputs, possibly edited: values and indices may select any number of
        experts (scale or clamp a coefficient, or add an expert top-k did not pick)."""
        y = mxd_decode(z, self.decoder, self.experts, values, indices, self.bias)
        return y if self.skip is None else y + self.skip(x)

    def forward(self, x: Tensor) -> Tensor:
        z, values, indices = self.encode(x)
        return self.decode(x, z, values, indices)

    # ---- the paper's training recipe -----------------------------------------------------

    @torch.no_grad()
    def normalize_experts(self) -> None:
        """Scale every expert row c_n to unit L2 norm (before each forward pass in training)."""
        norms = self.experts.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.experts.dtype).tiny)
        self.experts.div_(norms)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Remove from grad(c_n) its component along c_n (after backward, before the optimiser step)."""
        grad = self.experts.grad
        if grad is None:
            return
        c = self.experts
        unit = c / c.norm(dim=1, keepdim=True).clamp_min(torch.finfo(c.dtype).tiny)
        grad.sub_((grad * unit).sum(dim=1, keepdim=True) * unit)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def mxd_experts_for_budget(d_in: int, d_hidden: int, d_out: int, transcoder_width: int) -> int:
    """N such that an MxD (without glu or skip) has about the parameters of a TopK transcoder of the
    given width (encoder [d_in, width] + bias, decoder [width, d_out] + bias)."""
    d_in, d_hidden, d_out, transcoder_width = (
        _positive_int(name, value) for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out),
                                                       ("transcoder_width", transcoder_width)))
    transcoder = d_in * transcoder_width + transcoder_width + transcoder_width * d_out + d_out
    dense = d_in * d_hidden + d_hidden + d_hidden * d_out + d_out
    n = (transcoder - dense) // (d_in + 1 + d_out)
    if n < 1:
        raise ValueError(f"transcoder_width = {transcoder_width} leaves no expert: such a transcoder has {transcoder} "
                         f"parameters, MxD's dense part alone {dense}")
    return n
