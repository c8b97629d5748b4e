"""The paper's training recipe: the loss, the step (expert renormalisation before the forward pass, the
radial gradient component removed after backward), AdamW with linear warm-up, mixed precision, and the
dataset-wide activation scales that are folded back into the saved layer."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import reference
from ..module import MxD
from ..transcoder import TopKTranscoder

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def mxd_loss(y_hat: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """mean over tokens and features of (y^ - y)^2 / ||y||_2 (per-token L2 norm, not squared), in fp32."""
    y_hat, y = y_hat.float(), y.float()
    return ((y_hat - y) ** 2 / y.norm(dim=-1, keepdim=True).clamp_min(eps)).mean()


@torch.no_grad()
def fold_scales(layer: nn.Module, x_scale: float, y_scale: float) -> nn.Module:
    """Make a layer trained on (x_scale * x, y_scale * y) compute y from x: layer(x_scale x) / y_scale
    becomes layer(x) exactly (gate logits and so the selected experts are unchanged). In place."""
    if isinstance(layer, MxD):
        for lin in (layer.encoder, layer.glu, layer.gate):
            if lin is not None:
                lin.weight.mul_(x_scale)
        layer.decoder.div_(y_scale)
    elif isinstance(layer, TopKTranscoder):
        layer.encoder.weight.mul_(x_scale)
        layer.decoder.div_(y_scale)
    else:
        raise TypeError(f"cannot fold scales into a {type(layer).__name__}")
    layer.bias.div_(y_scale)
    if layer.skip is not None:
        layer.skip.weight.mul_(x_scale / y_scale)
    return layer


def activation_scales(x: Tensor, y: Tensor) -> tuple[float, float]:
    """Dataset-wide scalars that bring the mean token norms of x and y to sqrt(d_in) and sqrt(d_out)
    (averaged over ranks)."""
    packed = torch.stack([x.float().norm(dim=-1).mean(), y.float().norm(dim=-1).mean()]).double()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
        packed /= dist.get_world_size()
    return math.sqrt(x.shape[-1]) / float(packed[0]), math.sqrt(y.shape[-1]) / float(packed[1])


class TrainForward(nn.Module):
    """What the training step runs (and DDP or FSDP wraps): (y^, values, indices) of the layer. With a compute
    dtype other than the parameters' (bf16), parameters and inputs are cast to it for the computation
    and gradients flow back to the fp32 parameters: mixed precision that does not need autocast
    support in the ops."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype = torch.float32, dense_reference: bool = False):
        super().__init__()
        self.layer, self.compute_dtype, self.dense_reference = layer, dtype, dense_reference

    def forward(self, x: Tensor, cast: bool = True):
        p = next(self.layer.parameters())
        if cast and self.compute_dtype != p.dtype:
            params = {f"layer.{n}": t.to(self.compute_dtype) for n, t in self.layer.named_parameters()}
            return torch.func.functional_call(self, params, (x.to(self.compute_dtype),), {"cast": False})
        x = x.to(p.dtype)
        if self.dense_reference:   # the paper's dense computation, to compare throughput with
            return reference.layer_forward(self.layer, x)
        enc = self.layer.encode(x)
        return self.layer.decode(x, *enc), enc[-2], enc[-1]


def train_step(forward: nn.Module, layer: nn.Module, optimizer, scheduler, x: Tensor, y: Tensor):
    """One step of the recipe. Returns (loss, y^, values, indices) with y^ detached."""
    if isinstance(layer, MxD):
        layer.normalize_experts()
    y_hat, values, indices = forward(x)
    loss = mxd_loss(y_hat, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(layer, MxD):
        layer.remove_parallel_gradient()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), y_hat.detach(), values.detach(), indices.detach()


def make_optimizer(layer: nn.Module, lr: float, warmup: int):
    """The paper's AdamW (no weight decay) with linear warm-up; the fused kernel on CPU and CUDA (one
    pass over the parameters and moments: 6x faster than the per-tensor kernels on a CPU at the 32d budget)."""
    params = list(layer.parameters())
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    return optimizer, scheduler
