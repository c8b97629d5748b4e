"""The MxD layer: y = (a C) * (z D) + b, with z = phi(x E + b_e) and a = TopK(relu(x G^T + b_g))."""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import check_tensor
from .hooks import Coefficients, HookPoint, TracksHooks, coefficient_pair, hooked_call
from .hub import HubMixin
from .ops.mxd_decode import mxd_decode
from .ops.topk_gate import topk_gate

def gelu_tanh(t: Tensor) -> Tensor:
    """torch's tanh approximation of GELU (transformers' gelu_pytorch_tanh)."""
    return F.gelu(t, approximate="tanh")


def gelu_new(t: Tensor) -> Tensor:
    """The tanh approximation of GELU written out, as transformers' gelu_new (GPT-2) computes it; not
    bitwise equal to gelu_tanh."""
    return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * torch.pow(t, 3.0))))


def gelu_fast(t: Tensor) -> Tensor:
    """transformers' gelu_fast: the tanh approximation with the constant 0.7978845608, in its order."""
    return 0.5 * t * (1.0 + torch.tanh(t * 0.7978845608 * (1.0 + 0.044715 * t * t)))


def gelu_bloom(t: Tensor) -> Tensor:
    """BLOOM's GELU (transformers' bloom_gelu_forward): the tanh approximation with the constant 0.79788456."""
    return t * 0.5 * (1.0 + torch.tanh(0.79788456 * t * (1 + 0.044715 * t * t)))


def quick_gelu(t: Tensor) -> Tensor:
    """transformers' quick_gelu: t * sigmoid(1.702 t)."""
    return t * torch.sigmoid(1.702 * t)


def relu2(t: Tensor) -> Tensor:
    """Squared ReLU (transformers' relu2)."""
    return torch.square(F.relu(t))


# Each is computed exactly as the model code it stands for (transformers.activations), so a layer trained
# for a model's MLP applies the very function that MLP applies.
ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "gelu_new": gelu_new,
    "gelu_fast": gelu_fast,
    "gelu_bloom": gelu_bloom,
    "quick_gelu": quick_gelu,
    "relu2": relu2,
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


def _k_for(n_name: str, n: int, k) -> int:
    """k checked against the number of experts or latents n (named n_name)."""
    k = _positive_int("k", k)
    if k > n:
        raise ValueError(f"k must satisfy 1 <= k <= {n_name} = {n}, got k = {k}")
    return k


@torch.no_grad()
def _linear_init(weight: Tensor, bias: Optional[Tensor]) -> None:
    """weight uniform in +-1/sqrt(fan_in) (nn.Linear's bound), bias zero."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    weight.uniform_(-bound, bound)
    if bias is not None:
        bias.zero_()


class TopKGate(TracksHooks):
    """The top-k gate as a module: forward(x) = Coefficients(values, indices), the k largest entries of
    relu(x weight^T + bias) and their indices (mxd_fast.topk_gate, fused: the [..., n] logits are never
    stored). A forward hook on it sees, and may replace, those coefficients, also under torch.compile
    when registered after compiling (see mxd_fast.hooks). Parameters weight [n, in_features], bias [n];
    initialised as nn.Linear's weight (uniform in +-1/sqrt(in_features)) with a zero bias."""

    def __init__(self, in_features: int, n: int, k: int, device=None, dtype=None):
        super().__init__()
        self.in_features, self.n = in_features, n
        self.k = _k_for("n", n, k)
        self.weight = nn.Parameter(torch.empty(n, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(n, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _linear_init(self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n={self.n}, k={self.k}"

    def forward(self, x: Tensor) -> Coefficients:
        return Coefficients(*topk_gate(x, self.weight, self.bias, self.k))


class MxD(HubMixin, nn.Module):
    """Mixture of Decoders: n_experts full-rank linear experts W_n = D diag(c_n), k active per token,
    never materialised.

    Parameters: encoder (E, b_e), glu (if glu), gate (G, b_g), experts (C: [n_experts, d_out]),
    decoder (D: [d_hidden, d_out]), bias (b: [d_out]), skip (if skip, no bias).
    Initialised as in the paper: the weights of encoder, glu and gate uniform in +-1/sqrt(d_in)
    (nn.Linear's bound); every bias (encoder, glu, gate, output) zero; each expert row c_n uniform in
    [-1, 1], then scaled to unit L2 norm; decoder and skip zero (the layer starts at y = 0).

    Hook points (mxd_fast.HookPoint: a forward hook on one reads what passes and may replace it by
    returning a new value): hook_z (the hidden z [..., d_hidden]), hook_experts (Coefficients(values,
    indices) of the selected experts; a replacement may hold any number of columns) and hook_out (the
    output y). The gate is a module (mxd_fast.TopKGate) whose forward is the fused top-k gate: a forward
    hook on `gate` fires and sees, and may replace, Coefficients(values, indices) before hook_experts.
    Forward hooks on `encoder` and `glu` (nn.Linear) see their pre-activations. encode() and decode()
    pass through the same hooks as forward, so decode(x, *encode(x)) equals forward(x) with hooks too.
    A hook point or gate without hooks costs one Python call (no hook dispatch), and torch.compile sees
    hooks on them also when they are registered after compiling; register hooks on other submodules
    before compiling.
    mxd_fast.steer(layer, expert, scale) steers through hook_experts.
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n_experts: int, k: int, activation: str = "gelu",
                 glu: bool = False, skip: bool = False, device=None, dtype=None):
        super().__init__()
        d_in, d_hidden, d_out, n_experts = (
            _positive_int(name, value) for name, value in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out),
                                                           ("n_experts", n_experts)))
        k = _k_for("n_experts", n_experts, k)
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
        self.d_in, self.d_hidden, self.d_out, self.n_experts = d_in, d_hidden, d_out, n_experts
        self.activation = activation
        with _allocating("MxD", shapes, factory["dtype"], device):
            self.encoder = nn.Linear(d_in, d_hidden, **factory)
            self.glu = nn.Linear(d_in, d_hidden, **factory) if glu else None
            self.gate = TopKGate(d_in, n_experts, k, **factory)
            self.experts = nn.Parameter(torch.empty(n_experts, d_out, **factory))
            self.decoder = nn.Parameter(torch.empty(d_hidden, d_out, **factory))
            self.bias = nn.Parameter(torch.empty(d_out, **factory))
            self.skip = nn.Linear(d_in, d_out, bias=False, **factory) if skip else None
            self.reset_parameters()
        self.hook_z, self.hook_experts, self.hook_out = HookPoint(), HookPoint(), HookPoint()

    @property
    def k(self) -> int:
        """Experts active per token (the gate's k)."""
        return self.gate.k

    @k.setter
    def k(self, k: int) -> None:
        self.gate.k = _k_for("n_experts", self.n_experts, k)

    def constructor_arguments(self) -> dict:
        """The arguments that rebuild this layer's architecture: type(self)(**layer.constructor_arguments())."""
        return {"d_in": self.d_in, "d_hidden": self.d_hidden, "d_out": self.d_out, "n_experts": self.n_experts,
                "k": self.k, "activation": self.activation, "glu": self.glu is not None, "skip": self.skip is not None}

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.encoder, self.glu, self.gate):
            if linear is not None:
                _linear_init(linear.weight, linear.bias)
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
        """z = phi(x E + b_e), times (x W_glu + b_glu) in the GLU variant (before hook_z)."""
        z = ACTIVATIONS[self.activation](self.encoder(x))
        return z if self.glu is None else z * self.glu(x)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(z, values, indices): the dense hidden state and the k selected experts' coefficients, after
        the hooks on gate, hook_experts and hook_z."""
        _input(x, self.d_in)
        coefficients = hooked_call(self.hook_experts, hooked_call(self.gate, x))
        values, indices = coefficient_pair("the hooks on gate and hook_experts", coefficients)
        return hooked_call(self.hook_z, self.hidden(x)), values, indices

    def decode(self, x: Tensor, z: Tensor, values: Tensor, indices: Tensor) -> Tensor:
        """y from encode()'s outputs, possibly edited: values and indices may select any number of
        experts (scale or clamp a coefficient, or add an expert top-k did not pick); after hook_out."""
        y = mxd_decode(z, self.decoder, self.experts, values, indices, self.bias)
        return hooked_call(self.hook_out, y if self.skip is None else y + self.skip(x))

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
