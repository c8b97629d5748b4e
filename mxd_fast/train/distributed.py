"""Several ranks (torchrun): the process group, DDP or FSDP2 wrapping, per-rank shards for the resume
checkpoints, the full layer gathered on rank 0, and a clean exit."""
from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .layer_io import layer_spec
from .layers import build_layer
from .recipe import TrainForward

PARALLEL = ("ddp", "fsdp")


def init_distributed(device_name: str):
    """(rank, world size, local rank, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not dist.is_initialized()
    if started:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), started
    return 0, 1, 0, False


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of --device `name` for this rank: auto and a bare cuda mean the rank's own GPU."""
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def barrier(world: int) -> None:
    """dist.barrier() when there are several ranks."""
    if world > 1:
        dist.barrier()


def wrap_for_ranks(forward: TrainForward, parallel: str, device: torch.device) -> nn.Module:
    """The training forward of one rank of several (process group initialised; build the optimiser after).

    ddp: DistributedDataParallel, the layer replicated on every rank, gradients all-reduced (averaged).
    fsdp: FSDP2 `fully_shard`, in place: every parameter of the layer, its gradient and its AdamW state become
    DTensors sharded along dim 0 across the ranks, so an expert row of C (a gate row, a decoder row) stays
    whole on one rank and the per-row expert renormalisation and gradient projection of the recipe run on
    each rank's shard without communication. The whole layer is one FSDP unit: its parameters are
    all-gathered for the forward and backward passes and the gradients reduce-scattered (averaged, as with
    DDP). With a compute dtype other than the parameters' (bf16), the parameters are gathered in that dtype
    and the gradients reduced in the parameters' (the fp32 master weights stay fp32), as TrainForward's
    own cast does with DDP."""
    if parallel == "ddp":
        return nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda"
                                                   else None)
    if parallel != "fsdp":
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    import warnings
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    param_dtype = next(forward.layer.parameters()).dtype
    cast = forward.compute_dtype != param_dtype
    policy = MixedPrecisionPolicy(param_dtype=forward.compute_dtype if cast else None,
                                  reduce_dtype=param_dtype if cast else None)
    # the ops return reshaped views; train_step never modifies the outputs in place, which is what this warns of
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return fully_shard(forward, mesh=init_device_mesh(device.type, (dist.get_world_size(),)), mp_policy=policy)


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _like(ref, t: Tensor) -> Tensor:
    """A rank's shard `t` as a DTensor sharded like `ref`, if ref is one; else t."""
    if not isinstance(ref, DTensor):
        return t
    return DTensor.from_local(t, ref.device_mesh, ref.placements, shape=ref.shape, stride=ref.stride(),
                              run_check=False)


def local_state(layer: nn.Module, optimizer) -> tuple[dict, dict]:
    """The state dicts of the layer and its optimiser with plain tensors, for a per-rank checkpoint: this
    rank's shard in place of each sharded (FSDP) tensor; unchanged for a replicated layer."""
    opt = optimizer.state_dict()
    opt = {**opt, "state": {i: {k: _local(v) for k, v in s.items()} for i, s in opt["state"].items()}}
    return {name: _local(t) for name, t in layer.state_dict().items()}, opt


def load_local_state(layer: nn.Module, optimizer, layer_state: dict, optimizer_state: dict) -> None:
    """Inverse of local_state on a layer sharded (or not) as when it was saved."""
    ref = layer.state_dict()
    layer.load_state_dict({name: _like(ref[name], t) for name, t in layer_state.items()})
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: _like(params[i], v) if torch.is_tensor(v) and v.dim() else v for k, v in s.items()}
             for i, s in optimizer_state["state"].items()}   # AdamW's step counts are plain scalars
    optimizer.load_state_dict({**optimizer_state, "state": state})


def full_layer(layer: nn.Module, device) -> Optional[nn.Module]:
    """An unsharded copy of an FSDP-sharded layer on rank 0 (None on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(layer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    spec = dict(layer_spec(layer))
    plain = build_layer(spec.pop("arch"), **spec, device="meta", dtype=next(layer.parameters()).dtype)
    plain = plain.to_empty(device=device)
    plain.load_state_dict(state)
    return plain


def exit_without_shutdown(code: int = 0) -> None:
    """End a process of a distributed run once everything is written, skipping the interpreter's
    shutdown: with gloo, a worker thread left joinable there aborts the process ("terminate called
    without an active exception") in about one run in five, which torchrun reports as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
