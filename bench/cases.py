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
  embedding_bag  (gather_combine only) F.embedding_bag(indices, weight, per_sample_weights=values,
              mode="sum") and its gradients in weight and values: PyTorch's own kernel of the op.
  sparsify    (gather_combine only) the eager decoder of EleutherAI's sparsify (eai-sparsify),
              sparsify.utils.eager_decode(indices, values, W_dec) with W_dec = weight.mT ([d, N], the
              layout sparsify keeps): a TopK SAE library's decode as it runs on the CPU (on CUDA sparsify
              defaults to its Triton kernel, which this provider does not time). Unavailable where sparsify
              is not installed.
  torch, triton, cuda   the mxd_fast ops under use_backend(name).
  transcoder  (train only) mxd_fast.TopKTranscoder of width 32*d (about the parameter count of the
              MxD), k = K, on the "auto" backend.
  mlp         (train only) a dense MLP d -> 4d -> d with GELU: the layer MxD replaces.

FLOPs (2 per multiply-add; elementwise work, selection, the loss and the optimiser not counted) are
the FLOPs of the provider's own algorithm: the dense providers are charged the dense products they
actually run (T*N*d), the sparse ones the K-sparse products (T*K*d). The ops' FLOPs, compulsory bytes
and inputs are their specs' (mxd_fast.specs.<op>: flops, bytes, bench_inputs); their baselines are
BASELINES below. With T tokens:
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
import importlib.util
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

import mxd_fast
from mxd_fast import reference
from mxd_fast.specs import SPECS, OpSpec, random_selection  # noqa: F401  (random_selection: part of this module's API)

from .shapes import MLP_FACTOR, Shape

TRAIN = "train"
OPS = (*SPECS, TRAIN)
OP_MODES = ("fwd", "fwd+bwd")
TRAIN_MODE = "step"
BACKENDS = ("torch", "triton", "cuda")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A provider of an op case besides the reference and the backends: a baseline to compare with."""
    forward: Callable[[dict], Any]          # the differentiable output, from the case's named inputs
    dense: bool                             # charged the dense FLOPs and workspace of the op
    partial: bool = False                   # times a part of the op only (no speedup vs the reference)
    differentiates: tuple[str, ...] | None = None           # its gradients (None: the op's differentiable inputs)
    flops: Callable[[Shape], tuple[float, float]] | None = None   # (forward, backward); None: the op's
    unavailable: Callable[[], str | None] | None = None     # why it cannot run here (None: it can)


def _embedding_bag(i: dict) -> torch.Tensor:
    return F.embedding_bag(i["indices"], i["weight"], per_sample_weights=i["values"], mode="sum")


def _sparsify_decode(i: dict) -> torch.Tensor:
    from sparsify.utils import eager_decode   # imports transformers: only when the provider runs

    return eager_decode(i["indices"], i["values"], i["weight"].mT)


def _sparsify_missing() -> str | None:
    if importlib.util.find_spec("sparsify") is None:
        return "sparsify is not installed (pip install eai-sparsify)"
    return None


BASELINES: dict[str, dict[str, Baseline]] = {
    "topk_gate": {
        "gemm+topk": Baseline(lambda i: torch.addmm(i["bias"], i["x"], i["weight"].t()).relu_().topk(i["k"], dim=1)
                              .values, dense=True),
    },
    "gather_combine": {
        "embedding_bag": Baseline(_embedding_bag, dense=False),
        "sparsify": Baseline(_sparsify_decode, dense=False, unavailable=_sparsify_missing),
    },
    "mxd_decode": {
        "gemm": Baseline(lambda i: i["z"] @ i["decoder"], dense=False, partial=True, differentiates=("z", "decoder"),
                         flops=lambda s: (2 * s.T * s.H * s.d, 4 * s.T * s.H * s.d)),
    },
}
TRAIN_PROVIDERS = ("reference", *BACKENDS, "transcoder", "mlp")
DENSE_PROVIDERS = ("reference", *(n for b in BASELINES.values() for n, x in b.items() if x.dense), "mlp")
PARTIAL_PROVIDERS = tuple(n for b in BASELINES.values() for n, x in b.items() if x.partial)


def modes_for(op: str) -> tuple[str, ...]:
    return ("fwd+bwd", TRAIN_MODE) if op == TRAIN else OP_MODES


def all_providers(op: str) -> tuple[str, ...]:
    if op == TRAIN:
        return TRAIN_PROVIDERS
    return ("reference", *BASELINES.get(op, {}), *BACKENDS)


def provider_unavailable(provider: str, device: torch.device) -> str | None:
    """None when the provider can run on `device`, else why not."""
    if provider in BACKENDS:
        from mxd_fast.backend import unavailable_reason

        return unavailable_reason(provider, device)
    for baselines in BASELINES.values():
        baseline = baselines.get(provider)
        if baseline is not None and baseline.unavailable is not None:
            return baseline.unavailable()
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


def _ctx(provider: str):
    if provider in BACKENDS:
        return mxd_fast.use_backend(provider)
    return contextlib.nullcontext()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ---- op cases: inputs, FLOPs and bytes from the op's spec (mxd_fast.specs) --------------------------

def _make_op_inputs(spec: OpSpec, backward: bool, s: Shape, dtype, device, seed: int) -> dict:
    inputs = spec.bench_inputs(s, dtype, device, _gen(device, seed), backward)
    if backward:
        for name in spec.differentiable:
            inputs[name].requires_grad_(True)
    inputs["_diff"] = spec.differentiable
    return inputs


def _op_input_bytes(spec: OpSpec, backward: bool, s: Shape, dtype) -> int:
    """The bytes of one copy of the inputs (with the output gradient), from meta tensors of their shapes."""
    meta = torch.device("meta")
    inputs = spec.bench_inputs(s, dtype, meta, torch.Generator().manual_seed(0), backward)
    return _nbytes(*inputs.values())


def _op_forward(spec: OpSpec, provider: str) -> Callable[[dict], Any]:
    """The forward call of the provider; returns the differentiable output."""
    baseline = BASELINES.get(spec.name, {}).get(provider)
    if baseline is not None:
        return baseline.forward
    fn = spec.reference if provider == "reference" else spec.op
    return lambda i: spec.primary(spec.call(fn, i))


def op_case(op: str, mode: str, provider: str, s: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    if op not in SPECS or mode not in OP_MODES:
        raise ValueError(f"unknown op case {op}/{mode}")
    if provider not in all_providers(op):
        raise ValueError(f"provider {provider!r} does not apply to {op}")
    spec = SPECS[op]
    es = torch.empty((), dtype=dtype).element_size()
    backward = mode == "fwd+bwd"
    baseline = BASELINES.get(op, {}).get(provider)
    dense = provider in DENSE_PROVIDERS
    forward = _op_forward(spec, provider)
    used = baseline.differentiates if baseline is not None else None   # the inputs the provider differentiates
    fwd_flops, bwd_flops = baseline.flops(s) if baseline is not None and baseline.flops else spec.flops(s, dense)

    def call(inp: dict):
        with _ctx(provider):
            if not backward:
                with torch.no_grad():
                    return forward(inp)
            out = forward(inp)
            return torch.autograd.grad(out, [inp[n] for n in used or inp["_diff"]], inp["grad_out"])

    return Case(op=op, mode=mode, provider=provider, shape=s, dtype=dtype, device=device,
                flops=float(fwd_flops + (bwd_flops if backward else 0)), bytes=spec.bytes_of(s, es, backward),
                input_bytes=_op_input_bytes(spec, backward, s, dtype),
                workspace_bytes=spec.workspace(s, es, dense, backward),
                _inputs=lambda c: _make_op_inputs(spec, backward, s, dtype, device, seed=1000 + c), _fn=lambda: call)


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
    total = encoder + SPECS["topk_gate"].bytes_of(s, es, True) + SPECS["mxd_decode"].bytes_of(s, es, True)
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
    if provider not in all_providers(TRAIN):
        raise ValueError(f"provider {provider!r} does not apply to train")
    if mode not in modes_for(TRAIN):
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

    return Case(op=TRAIN, mode=mode, provider=provider, shape=s, dtype=dtype, device=device,
                flops=_train_flops(provider, s), bytes=_train_bytes(provider, s, es, full_step),
                input_bytes=3 * s.T * s.d * es,
                workspace_bytes=_train_workspace(provider, s, es), note=note, _inputs=make_batch, _fn=make_fn)


def _train_ctx(provider: str):
    if provider == "transcoder":
        return mxd_fast.use_backend("auto")
    return _ctx(provider)


def make_case(op: str, mode: str, provider: str, s: Shape, dtype: torch.dtype, device: torch.device) -> Case:
    if op == TRAIN:
        return train_case(provider, s, dtype, device, mode)
    return op_case(op, mode, provider, s, dtype, device)
