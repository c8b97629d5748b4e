"""Splice a trained layer into a language model in place of an MLP, and measure next-token
cross-entropy: clean, with the layer spliced in, and with the MLP zero-ablated (the floor). The model: a
transformers causal LM, a TransformerLens HookedTransformer or an nnsight LanguageModel
(mxd_fast.train.models)."""
from __future__ import annotations

import contextlib
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import check_tensor
from ..module import _positive_int
from .data import Harvester, check_input_ids
from .models import adapt


class SplicedMLP(nn.Module):
    """Wraps a layer mapping [..., d_in] -> [..., d_out] (MxD, TopKTranscoder, ...) so that it stands in
    for a transformer MLP: the model's dtype in and out, the layer's dtype and device inside."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        p = next(self.layer.parameters(), x)   # a layer without parameters gets x as it is
        y = self.layer(x.reshape(-1, x.shape[-1]).to(device=p.device, dtype=p.dtype))
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(device=x.device, dtype=x.dtype)


class ZeroMLP(nn.Module):
    """Zero ablation: the MLP's output replaced by zeros."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return torch.zeros_like(x)


def splice_layer(model, layer_index: int, layer: nn.Module) -> nn.Module:
    """Replace the MLP of block `layer_index` by `layer`, wrapped in SplicedMLP (the model's dtype and
    shape in and out) unless it takes the MLP's input as it is: ZeroMLP, a SplicedMLP, a module marked
    `_is_mlp_replacement = True`, or a module an earlier splice_layer took out. The layer receives exactly
    the MLP's input and its output goes where the MLP's did (for OPT, BART, BERT, BLOOM and MPT, whose MLP
    is three parts of a larger module, before the residual add that module does). Returns the module that
    was replaced, so that `splice_layer(model, i, old)` restores the model exactly."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
    site = adapt(model).mlp(layer_index)
    inner = layer.layer if isinstance(layer, SplicedMLP) else layer
    for name in ("d_in", "d_out"):   # a layer of another width would fail only at the next forward pass
        size = getattr(inner, name, None)
        if isinstance(size, int) and size != site.d:
            raise ValueError(f"layer has {name} = {size}, but the model's blocks are {site.d} wide")
    as_is = (isinstance(layer, (SplicedMLP, ZeroMLP)) or getattr(layer, "_is_mlp_replacement", False)
             or layer in _TAKEN_OUT)
    old = site.replace(layer if as_is else SplicedMLP(layer))
    _TAKEN_OUT.add(old)
    return old


_TAKEN_OUT: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()   # modules splice_layer replaced


@contextlib.contextmanager
def spliced(model, layer_index: int, layer: nn.Module):
    """`with spliced(model, 12, mxd): model(ids)` runs the model with `mxd` in place of block 12's MLP."""
    old = splice_layer(model, layer_index, layer)
    try:
        yield model
    finally:
        splice_layer(model, layer_index, old)


def _token_ce(logits: Tensor, input_ids: Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy (fp32) and the number of predicted tokens."""
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(loss), target.numel()


def _next_token_logprobs(logits: Tensor) -> Tensor:
    """fp32 log-probabilities at the positions _token_ce scores."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _token_kl(clean_logprobs: Tensor, logits: Tensor) -> float:
    """Summed KL(clean || other) of the next-token distributions (clean given as _next_token_logprobs)."""
    q = _next_token_logprobs(logits)
    return float((clean_logprobs.exp() * (clean_logprobs - q)).sum())


def _check_contexts(model, contexts, batch) -> int:
    """batch, once checked: contexts [n, T] with tokens to predict (n >= 1, T >= 2) and T at most the
    model's positions; batch >= 1."""
    check_tensor("contexts", contexts, ndim=2)
    if contexts.shape[0] == 0 or contexts.shape[1] < 2:
        raise ValueError(f"contexts (shape {tuple(contexts.shape)}) has no token to predict: give at least one "
                         f"context, each of >= 2 tokens")
    check_input_ids("contexts", contexts, model)
    return _positive_int("batch", batch)


@torch.no_grad()
def cross_entropy(model, contexts: Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy of the model over the contexts [n, T]."""
    batch = _check_contexts(model, contexts, batch)
    adapter = adapt(model)
    device = adapter.device()
    total, count = 0.0, 0
    for i in range(0, contexts.shape[0], batch):
        ids = contexts[i:i + batch].to(device)
        s, c = _token_ce(adapter.logits(ids), ids)
        total, count = total + s, count + c
    return total / max(count, 1)


class _Reconstruction:
    """Sums over the evaluated tokens of the layer's squared error, y's squared norm, y and its square (for
    the variance) and the active experts."""

    def __init__(self):
        self.err = self.energy = self.y_sq = self.l0 = 0.0
        self.y_sum = None
        self.rows = 0

    def add(self, layer: nn.Module, x: Tensor, y: Tensor) -> None:
        p = next(layer.parameters(), x)   # the layer's device and dtype (x's for a layer without parameters)
        x = x.to(device=p.device, dtype=p.dtype)
        y = y.to(device=p.device, dtype=torch.float32)
        if hasattr(layer, "encode") and hasattr(layer, "decode"):
            enc = layer.encode(x)
            y_hat = layer.decode(x, *enc).float()
            self.l0 += float((enc[-2] > 0).sum())
        else:
            y_hat = layer(x).float()
        self.err += float(((y_hat - y) ** 2).sum())
        self.energy += float((y ** 2).sum())
        self.y_sq += float((y.double() ** 2).sum())
        self.y_sum = y.double().sum(0) if self.y_sum is None else self.y_sum + y.double().sum(0)
        self.rows += y.shape[0]

    def metrics(self) -> dict:
        variance = self.y_sq - float((self.y_sum ** 2).sum()) / max(self.rows, 1) if self.rows else float("nan")
        return {"eval_nmse": self.err / self.energy if self.energy > 0 else float("nan"),
                "eval_fvu": self.err / variance if self.rows and variance > 0 else float("nan"),
                "eval_l0": self.l0 / self.rows if self.rows else float("nan")}


def _progress_bar(total: int, enabled: bool):
    """A tqdm bar of the evaluated contexts, or None (not asked for, or tqdm not installed)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="context", desc="evaluating", dynamic_ncols=True, file=sys.stdout)


@torch.no_grad()
def evaluate(model, layer: nn.Module, layer_index: int, contexts: Tensor, batch: int = 8,
             log=None, progress: bool = False) -> dict:
    """Next-token CE on held-out contexts [n, T]: clean, with `layer` spliced in place of the MLP of
    block `layer_index`, and with that MLP zero-ablated; plus the layer's reconstruction on the same
    tokens (nmse = sum ||y^ - y||^2 / sum ||y||^2, fvu = the same over the variance of y, l0).

    delta_ce = ce_spliced - ce_clean; ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean);
    kl_spliced and kl_zero_ablation: the mean KL divergence of the next-token distribution from the clean
    model's (nats per token; unlike delta_ce, never below zero, so it ranks layers that are all close).
    log(text) is called after each batch; progress=True shows a tqdm bar of the contexts."""
    batch = _check_contexts(model, contexts, batch)
    adapter = adapt(model)
    device = adapter.device()
    was_training = layer.training
    layer.eval()
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    kl = {"spliced": 0.0, "zero": 0.0}
    count = 0
    reconstruction = _Reconstruction()
    bar = _progress_bar(contexts.shape[0], progress)
    try:
        with Harvester(model, layer_index) as harvester:
            for i in range(0, contexts.shape[0], batch):
                ids = contexts[i:i + batch].to(device)
                out, (x, y) = harvester.run_and_capture(ids)
                clean_logits = adapter.logits_of(out)
                s, c = _token_ce(clean_logits, ids)
                ce["clean"] += s
                count += c
                clean_logprobs = _next_token_logprobs(clean_logits)
                reconstruction.add(layer, x, y)
                for name, replacement in (("spliced", layer), ("zero", ZeroMLP())):
                    with spliced(model, layer_index, replacement):
                        logits = adapter.logits(ids)
                    ce[name] += _token_ce(logits, ids)[0]
                    kl[name] += _token_kl(clean_logprobs, logits)
                    del logits
                del out, clean_logits, clean_logprobs
                if bar is not None:
                    bar.update(ids.shape[0])
                if log is not None:
                    log(f"evaluated {i + ids.shape[0]}/{contexts.shape[0]} contexts")
    finally:
        layer.train(was_training)   # also when a batch fails
        if bar is not None:
            bar.close()
    clean, spl, zero = (ce[k] / max(count, 1) for k in ("clean", "spliced", "zero"))
    gap = zero - clean
    return {
        "ce_clean": clean, "ce_spliced": spl, "ce_zero_ablation": zero,
        "delta_ce": spl - clean, "delta_ce_zero_ablation": zero - clean,
        "kl_spliced": kl["spliced"] / max(count, 1), "kl_zero_ablation": kl["zero"] / max(count, 1),
        "ce_recovered": (zero - spl) / gap if gap > 0 else float("nan"),
        **reconstruction.metrics(),
        "eval_tokens": count,
    }
