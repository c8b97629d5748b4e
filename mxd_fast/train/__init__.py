"""Training MxD layers (and TopK transcoder baselines) on the MLP of a language model: the application on top
of the mxd_fast kernels. `python -m mxd_fast.train --help` (or `mxd-train --help`) lists the options.

    cli           the command line: options, their defaults, run(argv) -> metrics, main(argv) -> exit status
    trainer       Trainer: setup, step, log_window, checkpoint, finish
    data          the language model, the text, harvesting, the shuffling activation buffer
    recipe        the paper's loss, training step, optimiser, mixed precision, activation scales
    layers        the layers and their sizes at a parameter budget
    layer_io      save_layer / load_layer / layer_spec (layer.safetensors + config.json)
    checkpoint    the run folder's files, atomic writes, resume checkpoints
    stats         firing statistics, logged windows, the training curve, the summary
    evaluate      splice a layer into the model; held-out CE, KL and reconstruction
    distributed   several ranks: DDP, FSDP2, per-rank shards

Importing this package needs torch only; loading a model, save_layer and load_layer need the packages of
the `train` extra (pip install 'mxd_fast[train]') and raise an ImportError naming it without them.
`main(argv)` here runs the trainer and returns its metrics; the console command is `cli.main`, which
returns an exit status.
"""
from .checkpoint import (CONFIG_FILE, FIRING_FILE, HISTORY_FILE, LAYER_FILE, METRICS_FILE, PLOT_FILE, RUN_OPTIONS,
                         atomic_save, run_files)
from .cli import EMBEDDED_DEFAULTS, EMBEDDED_GPU_DEFAULTS, PAPER_DEFAULTS, build_parser
from .cli import run as main
from .distributed import (PARALLEL, exit_without_shutdown, full_layer, load_local_state, local_state,
                          wrap_for_ranks)
from .evaluate import SplicedMLP, ZeroMLP, cross_entropy, splice_layer, spliced
from .extras import MissingExtraError
from .layer_io import layer_spec, load_layer, save_layer
from .layers import ARCHS, budget_parameters, build_layer, size_for_budget
from .recipe import DTYPES, TrainForward, activation_scales, fold_scales, make_optimizer, mxd_loss, train_step
from .stats import FiringStats
from .trainer import Trainer, op_backend

__all__ = ["ARCHS", "build_layer", "budget_parameters", "size_for_budget", "mxd_loss", "load_layer", "save_layer",
           "splice_layer", "spliced", "SplicedMLP", "ZeroMLP", "FiringStats", "atomic_save", "main",
           "layer_spec", "fold_scales", "activation_scales", "train_step", "make_optimizer", "TrainForward",
           "Trainer", "MissingExtraError", "cross_entropy"]
