"""Benchmark cases: one (op, mode, provider, shape, dtype, device) with its inputs, the call to time,
its FLOPs, its byte traffic and an estimate of its memory.

Ops and modes
  topk_gate, gather_combine, mxd_decode: "fwd" (the op alone, no autograd) and "fwd+bwd" (the op
  and torch.autograd.grad of every floating input, with a random output gradient).
  train: "step": one training step of a whole layer: the paper's renormalisation of the expert
  rows, forward, loss, backward, removal of the gradient parallel to each expert row, AdamW step;
  "fwd+bwd": the forward, loss and backward of the layer alone (no renormalisation, no optimiser).
  The input x does not require a gradient (it is a frozen model's activation).

Providers
  reference   mxd_fast.reference: the paper's dense computation (dense gate logits, top-k scattered
              into a dense [T, N] tensor, dense products; autograd through them).
  gemm+topk   (topk_gate only) torch.addmm + relu + torch.topk: the obvious baseline of the gate.
  gemm        (mxd_decode only) the dense z @ decoder product alone (and its two gradients): the floor
              a fused decode, which adds the gathered expert rows to its epilogue, is measured against.
  torch, triton, cuda   the mxd_fast ops under use_backend(name).
  transcoder  (train only) mxd_fast.TopKTranscoder of width 32*d (about the parameter count of the
              MxD), k = K, on the "auto" backend.
  mlp         (train only) a dense MLP d -> 4d -> d with GELU: the layer MxD replaces.

FLOPs (2 per multiply-add; elementwise work, selection, the loss and the optimiser not counted) are
the FLOPs of the provider's own algorithm: the dense providers are charged the dense products they
actually run (T*N*d), the sparse ones the K-sparse products (T*K*d). With T tokens:
  topk_gate      fwd: 2TNd (gate GEMM, every provider)
                 bwd: dense 4TNd (dx, dW from the dense [T, N] gradient); sparse 4TKd
  gather_combine fwd: dense 2TNd, sparse 2TKd; bwd (dW, dvalues): dense 4TNd, sparse 4TKd
  mxd_decode     fwd: 2THd + (dense 2TNd | sparse 2TKd) + 2Td
                 bwd: 4THd (dz, dD) + (dense 4TNd | sparse 4TKd) (dC, dvalues) + 2Td
                 gemm: fwd 2THd, bwd 4THd
  train (MxD)    fwd: 2T(dH + Nd + Hd) + (dense 2TNd | sparse 2TKd)
                 bwd: 2TdH (dE) + 4THd (dz, dD) + gate dW (dense 2TNd | sparse 2TKd)
                      + dC, dvalues (dense 4TNd | sparse 4TKd)
  transcoder     fwd: 2TWd + 2TKd; bwd: 2TKd (encoder dW) + 4TKd (decoder dW, dvalues); W = 32d
  mlp            fwd: 2*2T*d*4d; bwd: 3*2T*d*4d (dW1, dW2, dh)
Bytes (the same for every provider of an op case): the traffic any implementation must have: every
dense operand read once, every output written once (dense gradients of [N, D] weights in full), every
gathered row read once per use (T*K rows of D elements). The MxD training case of the torch, triton and
cuda providers: the encoder's GEMMs, the gate's bytes less its dx (x is frozen), the decode's, the
loss; the full step adds AdamW (read parameter, gradient and both moments, write three) and the expert
renormalisation (read and write C, and C and its gradient for the gradient projection). The other
training providers: none.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import mxd_fast
from mxd_fast import reference

from .shapes import MLP_FACTOR, Shape

OPS = ("topk_gate", "gather_combine", "mxd_decode", "train")
OP_MODES = ("fwd", "fwd+bwd")
TRAIN_MODE = "step"
BACKENDS = ("torch", "triton", "cuda")
DENSE_PROVIDERS = ("reference", "gemm+topk", "mlp")
PARTIAL_PROVIDERS = ("gemm",)   # time a part of the op (a floor to compare with), not the op itself


def modes_for(op: str) -> tuple[str, ...]:
    return ("fwd+bwd", TRAIN_MODE) if op == "train" else OP_MODES


def all_providers(op: str) -> tuple[str, ...]:
    if op == "topk_gate":
        return ("reference", "gemm+topk", *BACKENDS)
    if op == "mxd_decode":
        return ("reference", "gemm", *BACKENDS)
    if op == "train":
        return ("reference", *BACKENDS, "transcoder", "mlp")
    return ("reference", *BACKENDS)


def provider_unavailable(provider: str, device: torch.device) -> str | None:
    """None when the provider can run on `device`, else why not."""
    if provider in BACKENDS:
        from mxd_fast.backend import unavailable_reason

        return unavailable_reason(provider, device)
    return None


@dataclasses.dataclass
class Case:
    op: str
    mode: str
    provider: str
    shape: Shape
    dtype: torch.dtype
    device: torch.device
    flops: float
    bytes: float | None
    input_bytes: int          # one copy of the rotated inputs
    workspace_bytes: int      # estimated memory beyond the inputs (outputs, temporaries, state)
    note: str = ""
    _inputs: Callable[[int], Any] | None = None
    _fn: Callable[[], Callable[[Any], Any]] | None = None

    def estimated_memory(self, copies: int) -> int:
        return int(self.workspace_bytes + copies * self.input_bytes)

    def make_inputs(self, copies: int) -> list:
        """`copies` independent random inputs (different seeds), rotated over by the timers. Every
        provider of one op, mode and shape gets the same inputs."""
        return [self._inputs(c) for c in range(copies)]

    def make_fn(self) -> Callable[[Any], Any]:
        """The timed call: fn(inputs[i]). For a training step this creates the model and optimiser."""
        return self._fn()

    def build(self, copies: int = 1) -> tuple[Callable[[Any], Any], list]:
        return self.make_fn(), self.make_inputs(copies)


# ---- inputs ---------------------------------------------------------------------------------

def _gen(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape, dtype, device, gen, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, generator=gen) * scale).to(dtype)


def random_selection(T: int, N: int, K: int, dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """K distinct experts per token, uniform over [0, N), and positive values sorted descending."""
    idx = torch.randint(0, N - K + 1, (T, K), device=device, generator=gen).sort(dim=1).values
    idx += torch.arange(K, device=device)
    # shuffle within the row so the expert order is not sorted
    perm = torch.rand(T, K, device=device, generator=gen).argsort(dim=1)
    idx = idx.gather(1, perm)
    values = torch.rand(T, K, device=device, generator=gen).add_(0.05).sort(dim=1, descending=True).values
    return values.to(dtype), idx


def _ctx(provider: str):
    if provider in BACKENDS:
        return mxd_fast.use_backend(provider)
    return contextlib.nullcontext()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---- op cases ---------------------------------------------------------------------------------

def _op_flops(op: str, mode: str, dense: bool, s: Shape, provider: str = "") -> float:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    width = N if dense else K
    if provider == "gemm":
        fwd, bwd = 2 * T * H * d, 4 * T * H * d
    elif op == "topk_gate":
        fwd, bwd = 2 * T * N * d, 4 * T * width * d
    elif op == "gather_combine":
        fwd, bwd = 2 * T * width * d, 4 * T * width * d
    elif op == "mxd_decode":
        fwd, bwd = 2 * T * H * d + 2 * T * width * d + 2 * T * d, 4 * T * H * d + 4 * T * width * d + 2 * T * d
    else:
        raise ValueError(op)
    return float(fwd + (bwd if mode == "fwd+bwd" else 0))


def _op_bytes(op: str, mode: str, s: Shape, es: int) -> float:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    sel = T * K * (es + 8)            # values + int64 indices
    gathered = T * K * d * es
    if op == "topk_gate":
        fwd = es * (T * d + N * d + N) + sel
        # read grad_values, values, indices, x; gathered rows of W (dx) and of x (dW); write dx, dW, dbias
        bwd = T * K * es + sel + T * d * es + 2 * gathered + es * (T * d + N * d + N)
    elif op == "gather_combine":
        fwd = sel + gathered + T * d * es
        # read grad_y, selection; gathered rows of W (dvalues), of grad_y (dW); write dW, dvalues
        bwd = T * d * es + sel + 2 * gathered + N * d * es + T * K * es
    elif op == "mxd_decode":
        fwd = es * (T * H + H * d + d) + sel + gathered + T * d * es
        bwd = (es * (T * d + T * H + H * d) + sel + 2 * gathered
               + es * (T * H + H * d + N * d + T * K + d))
    else:
        raise ValueError(op)
    return float(fwd + (bwd if mode == "fwd+bwd" else 0))


def _op_workspace(op: str, mode: str, dense: bool, s: Shape, es: int) -> int:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    bn = T * N * es
    tile = (1 << 22) * 4              # the torch backend's tiles and gather chunks
    bwd = mode == "fwd+bwd"
    if op == "topk_gate":
        grads = es * (T * d + N * d + N) if bwd else 0
        work = (4 * bn if bwd else 2 * bn) if dense else 3 * tile
    elif op == "gather_combine":
        grads = es * (N * d + T * K) if bwd else 0
        work = (3 * bn if bwd else bn) if dense else tile + T * K * 24
        work += 2 * T * d * es
    else:
        grads = es * (T * H + H * d + N * d + T * K + d) if bwd else 0
        work = (3 * bn if bwd else bn) if dense else tile + T * K * 24
        work += 6 * T * d * es
    return int(1.25 * (grads + work + T * K * (es + 8)))


def _make_op_inputs(op: str, mode: str, s: Shape, dtype, device, seed: int) -> dict:
    gen = _gen(device, seed)
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    grad = mode == "fwd+bwd"
    if op == "topk_gate":
        inp = {"x": _randn((T, d), dtype, device, gen),
               "weight": _randn((N, d), dtype, device, gen, 1 / math.sqrt(d)),
               "bias": _randn((N,), dtype, device, gen, 0.1)}
        diff = ("x", "weight", "bias")
        if grad:
            inp["grad_out"] = _randn((T, K), dtype, device, gen)
    elif op == "gather_combine":
        values, indices = random_selection(T, N, K, dtype, device, gen)
        inp = {"weight": _randn((N, d), dtype, device, gen, 1 / math.sqrt(d)), "values": values, "indices": indices}
        diff = ("weight", "values")
        if grad:
            inp["grad_out"] = _randn((T, d), dtype, device, gen)
    elif op == "mxd_decode":
        values, indices = random_selection(T, N, K, dtype, device, gen)
        experts = torch.randn(N, d, device=device, generator=gen)
        experts /= experts.norm(dim=1, keepdim=True)
        inp = {"z": _randn((T, H), dtype, device, gen),
               "decoder": _randn((H, d), dtype, device, gen, 1 / math.sqrt(H)),
               "experts": experts.to(dtype), "values": values, "indices": indices,
               "bias": _randn((d,), dtype, device, gen, 0.1)}
        diff = ("z", "decoder", "experts", "values", "bias")
        if grad:
            inp["grad_out"] = _randn((T, d), dtype, device, gen)
    else:
        raise ValueError(op)
    if grad:
        for name in diff:
            inp[name].requires_grad_(True)
    inp["_diff"] = diff
    return inp


def _op_forward(op: str, provider: str, K: int) -> Callable[[dict], Any]:
    """The forward call of the provider; returns the differentiable output."""
    if op == "topk_gate":
        if provider == "reference":
            return lambda i: reference.topk_gate(i["x"], i["weight"], i["bias"], K)[0]
        if provider == "gemm+topk":
            return lambda i: torch.addmm(i["bias"], i["x"], i["weight"].t()).relu_().topk(K, dim=1).values
        return lambda i: mxd_fast.topk_gate(i["x"], i["weight"], i["bias"], K)[0]
    if op == "gather_combine":
        f = reference.gather_combine if provider == "reference" else mxd_fast.gather_combine
        return lambda i: f(i["weight"], i["values"], i["indices"])
    if op == "mxd_decode":
        if provider == "gemm":
            return lambda i: i["z"] @ i["decoder"]
        f = reference.mxd_decode if provider == "reference" else mxd_fast.mxd_decode
        return lambda i: f(i["z"], i["decoder"], i["experts"], i["values"], i["indices"], i["bias"])
    raise ValueError(op)


def op_case(op: str, mode: str, provider: str, s: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    if op not in OPS[:3] or mode not in OP_MODES:
        raise ValueError(f"unknown op case {op}/{mode}")
    if provider not in all_providers(op):
        raise ValueError(f"provider {provider!r} does not apply to {op}")
    es = torch.empty((), dtype=dtype).element_size()
    dense = provider in DENSE_PROVIDERS
    forward = _op_forward(op, provider, s.K)
    used = ("z", "decoder") if provider == "gemm" else None   # the inputs the provider differentiates

    def call(inp: dict):
        with _ctx(provider):
            if mode == "fwd":
                with torch.no_grad():
                    return forward(inp)
            out = forward(inp)
            return torch.autograd.grad(out, [inp[n] for n in used or inp["_diff"]], inp["grad_out"])

    input_bytes = _op_input_bytes(op, mode, s, es)
    return Case(op=op, mode=mode, provider=provider, shape=s, dtype=dtype, device=device,
                flops=_op_flops(op, mode, dense, s, provider), bytes=_op_bytes(op, mode, s, es), input_bytes=input_bytes,
                workspace_bytes=_op_workspace(op, mode, dense, s, es),
                _inputs=lambda c: _make_op_inputs(op, mode, s, dtype, device, seed=1000 + c), _fn=lambda: call)


def _op_input_bytes(op: str, mode: str, s: Shape, es: int) -> int:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    sel = T * K * (es + 8)
    if op == "topk_gate":
        n = es * (T * d + N * d + N) + (T * K * es if mode == "fwd+bwd" else 0)
    elif op == "gather_combine":
        n = es * N * d + sel + (T * d * es if mode == "fwd+bwd" else 0)
    else:
        n = es * (T * H + H * d + N * d + d) + sel + (T * d * es if mode == "fwd+bwd" else 0)
    return int(n)


# ---- training-step cases ---------------------------------------------------------------------------

class DenseMLP(nn.Module):
    def __init__(self, d: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.up = nn.Linear(d, hidden, device=device, dtype=dtype)
        self.down = nn.Linear(hidden, d, device=device, dtype=dtype)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def make_model(provider: str, s: Shape, dtype, device) -> nn.Module:
    torch.manual_seed(0)
    if provider == "mlp":
        return DenseMLP(s.d, MLP_FACTOR * s.d, device=device, dtype=dtype)
    if provider == "transcoder":
        return mxd_fast.TopKTranscoder(s.d, s.transcoder_width, s.d, s.K, device=device, dtype=dtype)
    model = mxd_fast.MxD(s.d, s.H, s.d, s.N, s.K, activation="gelu", device=device, dtype=dtype)
    with torch.no_grad():  # the paper starts D and b at zero; random values keep every product non-trivial
        model.decoder.normal_(0.0, 1.0 / math.sqrt(s.H))
        model.bias.normal_(0.0, 0.1)
    return model


def parameter_count(provider: str, s: Shape) -> int:
    d, H, N = s.d, s.H, s.N
    if provider == "mlp":
        h = MLP_FACTOR * d
        return d * h + h + h * d + d
    if provider == "transcoder":
        w = s.transcoder_width
        return d * w + w + w * d + d
    return d * H + H + d * N + N + N * d + H * d + d


def _train_flops(provider: str, s: Shape) -> float:
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    if provider == "mlp":
        h = MLP_FACTOR * d
        return float(2 * 2 * T * d * h + 3 * 2 * T * d * h)
    if provider == "transcoder":
        w = s.transcoder_width
        return float(2 * T * w * d + 2 * T * K * d + 2 * T * K * d + 4 * T * K * d)
    width = N if provider == "reference" else K
    fwd = 2 * T * (d * H + N * d + H * d) + 2 * T * width * d
    bwd = 2 * T * d * H + 4 * T * H * d + 2 * T * width * d + 4 * T * width * d
    return float(fwd + bwd)


def _train_bytes(provider: str, s: Shape, es: int, full_step: bool) -> float | None:
    if provider not in BACKENDS:
        return None
    T, d, H, N, K = s.T, s.d, s.H, s.N, s.K
    encoder = es * (T * d + d * H + H + T * H) + es * (T * H + 2 * T * d + 2 * d * H + H)
    total = encoder + _op_bytes("topk_gate", "fwd+bwd", s, es) + _op_bytes("mxd_decode", "fwd+bwd", s, es)
    total -= es * (T * K * d + T * d)      # x needs no gradient: the gate's dx (its gathered rows, its write)
    total += 3 * T * d * es                                  # the loss: read y_hat and y, write its gradient
    if full_step:
        total += es * (7 * parameter_count(provider, s) + 5 * N * d)
    return float(total)


def _train_workspace(provider: str, s: Shape, es: int) -> int:
    T, d, H, N = s.T, s.d, s.H, s.N
    state = 5 * parameter_count(provider, s) * es        # param, grad, two AdamW moments, foreach temporaries
    if provider == "mlp":
        act = 4 * T * MLP_FACTOR * d * es
    elif provider == "transcoder":
        act = 3 * (1 << 22) * 4 + 4 * T * d * es
    else:
        act = 4 * T * H * es + 8 * T * d * es + (6 * T * N * es if provider == "reference" else 3 * (1 << 22) * 4)
    return int(1.25 * (state + act))


def train_case(provider: str, s: Shape, dtype: torch.dtype, device: torch.device, mode: str = TRAIN_MODE) -> Case:
    if provider not in all_providers("train"):
        raise ValueError(f"provider {provider!r} does not apply to train")
    if mode not in modes_for("train"):
        raise ValueError(f"mode {mode!r} does not apply to train")
    es = torch.empty((), dtype=dtype).element_size()
    is_mxd = provider not in ("transcoder", "mlp")
    full_step = mode == TRAIN_MODE
    note = f"params={parameter_count(provider, s)}"
    if provider == "transcoder":
        note += f", width={s.transcoder_width}, backend=auto"

    def make_batch(c: int):
        gen = _gen(device, 2000 + c)
        x = _randn((s.T, s.d), dtype, device, gen)
        y = _randn((s.T, s.d), dtype, device, gen)
        inv_norm = y.float().norm(dim=1, keepdim=True).clamp_min(1e-6).reciprocal().to(dtype)
        return x, y, inv_norm

    def make_fn():
        model = make_model(provider, s, dtype, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

        def step(batch):
            x, y, inv_norm = batch
            with _train_ctx(provider):
                if is_mxd and full_step:
                    model.normalize_experts()
                y_hat = reference.mxd_forward(model, x) if provider == "reference" else model(x)
                # the paper's loss: mean over tokens and features of (y_hat - y)^2 / ||y||_2
                loss = ((y_hat - y).square() * inv_norm).mean()
                loss.backward()
                if full_step:
                    if is_mxd:
                        model.remove_parallel_gradient()
                    opt.step()
                opt.zero_grad(set_to_none=True)
            return loss.detach()

        return step

    return Case(op="train", mode=mode, provider=provider, shape=s, dtype=dtype, device=device,
                flops=_train_flops(provider, s), bytes=_train_bytes(provider, s, es, full_step),
                input_bytes=3 * s.T * s.d * es,
                workspace_bytes=_train_workspace(provider, s, es), note=note, _inputs=make_batch, _fn=make_fn)


def _train_ctx(provider: str):
    if provider == "transcoder":
        return mxd_fast.use_backend("auto")
    return _ctx(provider)


def make_case(op: str, mode: str, provider: str, s: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    if op == "train":
        return train_case(provider, s, dtype, device, mode)
    return op_case(op, mode, provider, s, dtype, device)
