"""One training run: the Trainer that `python -m mxd_fast.train` (mxd_fast.train.cli) drives.

    trainer = Trainer(options)
    trainer.setup()                 # checks, resume, run folder, data, model, sizing, layer, optimiser
    with trainer.training():        # the first harvest, the progress bar, the op backend
        while trainer.running():
            trainer.step()          # one optimiser step; a logged window, a checkpoint when due
    metrics = trainer.finish()      # checkpoint, saved layer, evaluation, metrics, plot, summary
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..backend import unavailable_reason, use_backend
from ..cpu_memory import reuse_freed_memory
from ..module import ACTIVATIONS
from . import data as D
from . import layer_io
from .checkpoint import (FIRING_FILE, HISTORY_FILE, METRICS_FILE, PLOT_FILE, atomic_save, checkpoint_path,
                         load_resume_state, refuse_other_options, run_files, write_json)
from .corpus import StreamedCorpus, read_text
from .distributed import (barrier, full_layer, init_distributed, load_local_state, local_state, rank_device,
                          wrap_for_ranks)
from .evaluate import evaluate
from .layers import budget_parameters, build_layer, size_for_budget, unit_name
from .loggers import MetricLoggers
from .progress import HarvestBar, Log, progress_bar, training_eta
from .recipe import DTYPES, TrainForward, activation_scales, fold_scales, make_optimizer, train_step
from .stats import FiringStats, WindowSums, plot_history, plot_title, summary


EVAL_FRACTION = 0.02   # the share of the documents held out for the CE evaluation when --eval-text is not given


def op_backend(args) -> str:
    """The mxd_fast backend for the ops (the dense reference path uses none; evaluation runs on auto)."""
    return "auto" if args.backend == "reference" else args.backend


def memory_bytes(device: torch.device) -> int:
    """The device's whole memory: what no single request may exceed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refuse_past_memory(options: str, nbytes: int, memory: int, device: torch.device, what: str) -> None:
    if nbytes > memory:
        raise SystemExit(f"{options}: {what} need {nbytes / 2**30:,.4g} GiB, more than the whole "
                         f"{memory / 2**30:,.4g} GiB of {device}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


class Trainer:
    """A run of the trainer with resolved options (mxd_fast.train.cli.resolve_options). Every problem with
    the options, the data or the model is a SystemExit naming the option, raised by setup() before the
    run folder's old files are touched."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.model_label = args.model or "(embedded)"
        self.rank, self.world = 0, 1
        self.new_folders: list[Path] = []   # folders this run made: removed again if it fails while they are empty
        self.harvester = self.bar = None
        self.loggers, self.wandb_run_id = MetricLoggers(), None   # --log, on rank 0, opened by setup()

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        self._start_processes()
        self._check_resume_and_folder()
        self.t_start = time.perf_counter()
        self._locate_model()
        self._make_run_folder()
        self._seed()
        self._read_text()
        self._load_model()
        self._size_layer()
        self._build_layer()
        self._build_data_pipeline()
        self._restore()
        self._remove_old_run()
        self._open_loggers()

    def _start_processes(self) -> None:
        """Threads, the process group of several ranks, this rank's device, the batch split over the ranks."""
        a = self.args
        if a.threads:
            torch.set_num_threads(a.threads)
        self.rank, self.world, local_rank, self.owns_group = init_distributed(a.device)
        self.log = Log(self.rank, a.quiet)
        self.device = rank_device(a.device, local_rank)
        if a.reuse_freed_memory == "yes" or (a.reuse_freed_memory == "auto" and self.device.type == "cpu"):
            reuse_freed_memory()
        if a.backend not in ("auto", "reference") and (why := unavailable_reason(a.backend, self.device)) is not None:
            raise SystemExit(f"--backend {a.backend}: {why}")
        if a.batch % self.world:
            raise SystemExit(f"--batch {a.batch} must be a multiple of the number of ranks ({self.world})")
        self.rank_batch = a.batch // self.world
        self.steps = max(1, a.tokens // a.batch)
        self.ckpt_path = checkpoint_path(self.out, self.rank)

    def _check_resume_and_folder(self) -> None:
        """The checkpoint --resume continues from; a run already in --out is refused without --overwrite."""
        a = self.args
        self.resume_state = None
        if a.resume:
            self.resume_state = load_resume_state(a, self.out, self.ckpt_path, self.steps, self.world, self.device)
        self.old_run = [] if a.resume else run_files(self.out)   # removed once every check has passed
        if self.old_run and not a.overwrite:
            names = ", ".join(str(p.relative_to(self.out)) for p in self.old_run)
            raise SystemExit(f"--out {self.out} holds a run ({names}): --resume it, choose another --out, or "
                             "--overwrite it")

    def _locate_model(self) -> None:
        """Where the model loads from, settled before anything is read or written: a Hub name that is neither a
        local folder nor cached fails here, after one request, when the Hub cannot be reached."""
        try:
            self.model_source = D.model_source(self.args.model)
        except D.ModelUnavailableError as err:
            raise SystemExit(f"--model {self.model_label}: {err}") from None
        except (OSError, ValueError) as err:
            raise SystemExit(f"--model {self.model_label}: cannot load it ({type(err).__name__}: "
                             f"{_first_line(err)})") from None

    def _make_run_folder(self) -> None:
        if self.rank == 0:
            self.new_folders = [p for p in (self.out, *self.out.parents) if not p.exists()]
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise SystemExit(f"--out {self.out}: cannot create the folder ({err})") from None
        barrier(self.world)

    def _seed(self) -> None:
        a = self.args
        if a.warmup is not None:
            self.warmup = a.warmup
        elif self.resume_state is not None and "warmup" in self.resume_state:
            self.warmup = self.resume_state["warmup"]   # the run's own warm-up, even if --tokens grew
        else:
            self.warmup = max(1, min(5000, self.steps // 10))
        torch.manual_seed(a.seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(a.seed)

    def _read_text(self) -> None:
        """The training and held-out documents (read before the model loads, so that a bad --text fails at once):
        lists of strings, or StreamedCorpus for a datasets dataset (read as the run goes, never held whole)."""
        a = self.args
        if a.text:
            docs, self.corpus = _documents("--text", a.text, a)
        else:
            docs, self.corpus = D.default_corpus(self.log)
        if a.eval_text:
            self.train_docs, self.eval_docs = docs, _documents("--eval-text", a.eval_text, a)[0]
        else:
            self.train_docs, self.eval_docs = D.split_documents(docs, EVAL_FRACTION)
        if not any(isinstance(d, StreamedCorpus) for d in (self.train_docs, self.eval_docs)):
            for name, default in (("text_column", "text"), ("text_split", "train")):
                if getattr(a, name) != default:
                    raise SystemExit(f"--{name.replace('_', '-')} chooses from a datasets dataset; --text and "
                                     "--eval-text are read as text files here (see --text-format)")
        if _no_documents("--text", self.train_docs):
            raise SystemExit(f"--text: no training documents in {self.corpus} ("
                             + ("no row with text in the column" if isinstance(docs, StreamedCorpus) else
                                f"empty files, or no {'/'.join(D.TEXT_SUFFIXES)} files in a folder") + ")")
        if isinstance(self.train_docs, list) and isinstance(self.eval_docs, list):
            counts = f"{len(self.train_docs)} training and {len(self.eval_docs)} held-out documents"
        else:
            counts = "; ".join(f"{len(d)} {what} documents" if isinstance(d, list) else
                               f"{what} documents read as a stream"
                               for d, what in ((self.train_docs, "training"), (self.eval_docs, "held-out")))
        self.log(f"corpus: {self.corpus}; {counts}" + ("" if a.eval_text or isinstance(docs, list) else
                 f" (held out: those whose text hash falls in the lowest {EVAL_FRACTION:.0%})"))

    def _load_model(self) -> None:
        """The language model, --context and --layer checked against it, and its MLP's dimensions."""
        a = self.args
        self.log(f"loading {'the embedded SmolLM2-135M-Instruct (GGUF)' if a.model is None else a.model} on "
                 f"{self.device}")
        try:
            self.model, self.tokenizer = D.load_model(a.model, device=self.device, dtype=DTYPES[a.model_dtype],
                                                      source=self.model_source)
        except (OSError, ValueError) as err:    # not a model folder, a bad file, a model the cache lacks
            raise SystemExit(f"--model {self.model_label}: cannot load it ({type(err).__name__}: "
                             f"{_first_line(err)})") from None
        self.n_layers = D.num_layers(self.model)
        positions = D.max_positions(self.model)
        if positions is not None and a.context > positions:
            raise SystemExit(f"--context {a.context} is longer than the model's {positions} positions")
        if a.layer is None:
            a.layer = self.n_layers // 2
        if a.layer < 0 or (self.n_layers and a.layer >= self.n_layers):
            raise SystemExit(f"--layer must be in 0 .. {self.n_layers - 1}, got {a.layer}")
        try:
            self.dims = D.model_dims(self.model, a.layer)
        except ValueError as err:   # no <blocks>.<layer>.mlp module
            raise SystemExit(f"--model {self.model_label}: {err}") from None
        self.d = self.dims["d"]
        self.hidden = a.hidden or self.dims["hidden"]
        self.activation = a.activation or self.dims["activation"]
        if self.activation is None and a.arch == "mxd":
            why = self.dims.get("activation_refusal")
            raise SystemExit(f"--activation: the model's MLP activation {self.dims['model_activation']!r} has no "
                             f"MxD form{f' ({why})' if why else ''}; choose one of {', '.join(sorted(ACTIVATIONS))}")
        self.glu = self.dims["glu"] if a.glu == "auto" else a.glu == "yes"
        self._check_data_memory()

    def _check_data_memory(self) -> None:
        """Refuse a buffer, batch or harvest larger than the device's whole memory (not a hang or an OOM)."""
        a = self.args
        self.memory = memory_bytes(self.device)
        row = 2 * self.d * 4                                             # a harvested (x, y) pair, fp32
        for option, rows, what in ((f"--buffer {a.buffer}", a.buffer, "rows of x and y in the pool"),
                                   (f"--batch {a.batch}", self.rank_batch, "rows of x and y in a batch"),
                                   (f"--harvest-contexts {a.harvest_contexts}", a.harvest_contexts * a.context,
                                    "harvested rows of x and y at a time")):
            refuse_past_memory(option, rows * row, self.memory, self.device, f"{rows:,} {what}")

    def _size_layer(self) -> None:
        """Experts (latents) for the parameter budget, and the parameter count, checked on the meta device."""
        a = self.args
        sizes = " ".join(f"--{n} {getattr(a, n)}" for n in ("budget", "k", "hidden", "experts")
                         if getattr(a, n) is not None)
        self.width = int(round(a.budget * self.d))
        self.budget = budget_parameters(self.d, self.d, self.width)
        try:
            self.size = a.experts or size_for_budget(a.arch, self.width, self.d, self.hidden, self.d,
                                                     self.activation, self.glu, a.k)
        except ValueError as err:
            raise SystemExit(f"{sizes}: {err}, lower --k, or set --experts") from None
        try:   # a size no memory holds is refused before allocating
            meta = build_layer(a.arch, self.d, self.d, a.k, self.size, d_hidden=self.hidden,
                               activation=self.activation, glu=self.glu, device="meta")
            self.n_params = sum(p.numel() for p in meta.parameters())
        except (ValueError, TypeError, RuntimeError, OverflowError) as err:
            raise SystemExit(f"{sizes}: no layer of {self.size:,} {unit_name(a.arch)} can be built ({err})") from None
        refuse_past_memory(sizes, 16 * self.n_params, self.memory, self.device,
                           f"{self.n_params:,} parameters (fp32, with their gradients and AdamW's two moments)")

    def _build_layer(self) -> None:
        """The layer, its training forward (wrapped for several ranks, compiled if asked) and the optimiser."""
        a = self.args
        self.layer = build_layer(a.arch, self.d, self.d, a.k, self.size, d_hidden=self.hidden,
                                 activation=self.activation, glu=self.glu, device=self.device)
        if a.arch == "mxd":
            self.layer.normalize_experts()
        self.log(f"{a.arch}: {self.layer.extra_repr()}; {self.n_params:,} parameters (budget {self.budget:,}: a "
                 f"TopK transcoder of width {self.width}); layer {a.layer} of {self.n_layers}, d = {self.d}")
        self.forward = TrainForward(self.layer, DTYPES[a.dtype], dense_reference=a.backend == "reference")
        self.sharded = self.world > 1 and a.parallel == "fsdp"
        if self.world > 1:
            self.forward = wrap_for_ranks(self.forward, a.parallel, self.device)
        elif a.parallel == "fsdp":
            self.log("--parallel fsdp: a single process, nothing to shard")
        if a.compile:
            self.forward = torch.compile(self.forward)
        self.optimizer, self.scheduler = make_optimizer(self.layer, a.lr, self.warmup)

    def _build_data_pipeline(self) -> None:
        """Harvester, token stream and shuffling buffer of this rank; firing statistics and logged windows."""
        a = self.args
        self.harvester = D.Harvester(self.model, a.layer)
        stream = D.TokenStream(self.train_docs, self.tokenizer, a.context, seed=a.seed, rank=self.rank,
                               world=self.world)
        self.buffer = D.ActivationBuffer(self.harvester.harvest, stream, a.buffer, a.harvest_contexts,
                                         seed=a.seed * 7919 + self.rank, device=self.device)
        self.stats = FiringStats(self.size, device=self.device)
        self.history: list = []
        self.sums = WindowSums()
        self.steps_done, self.scales = 0, None

    def _restore(self) -> None:
        """The state of the checkpoint --resume continues from (its options checked again, --layer resolved)."""
        state = self.resume_state
        if state is None:
            return
        refuse_other_options(state, self.args, self.ckpt_path, self.world)
        load_local_state(self.layer, self.optimizer, state["layer"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.buffer.load_state_dict(state["buffer"])
        self.stats.load_state_dict(state["stats"])
        torch.set_rng_state(state["rng"])
        self.steps_done, self.history = int(state["step"]), list(state["history"])
        self.sums = WindowSums(state["acc"])
        self.scales = tuple(state["scales"])
        self.wandb_run_id = state.get("wandb_run_id")
        self.resume_state = None
        self.log(f"resumed from {self.ckpt_path} at step {self.steps_done}")

    def _remove_old_run(self) -> None:
        """--overwrite, every check passed: the old run's files go (every rank listed them before the barrier
        that follows making the folder, so none looks after rank 0 removes them)."""
        if self.old_run:
            if self.rank == 0:
                for p in self.old_run:
                    p.unlink(missing_ok=True)
            barrier(self.world)

    def _open_loggers(self) -> None:
        """The --log loggers on rank 0, once the old run's files are gone (a resumed run continues its curves)."""
        a = self.args
        if self.rank != 0 or not a.log:
            return
        self.loggers = MetricLoggers.open(a.log, self.out, history=self.history,
                                          resume_step=self.steps_done if a.resume else 0, config=self._run_config(),
                                          wandb_project=a.wandb_project, wandb_name=a.wandb_name,
                                          wandb_id=self.wandb_run_id)

    @contextlib.contextmanager
    def removing_new_folders_on_failure(self):
        """Whatever fails (a bad option, an unreachable model, Ctrl-C), the loggers are closed and the folders
        this run made are removed again while they are empty: a failed start leaves no empty run folder."""
        try:
            yield self
        except BaseException:
            self.loggers.close(failed=True)
            for folder in self.new_folders:   # the run folder first, then the parents it needed
                try:
                    folder.rmdir()
                except OSError:   # not empty (a checkpoint was written), or gone
                    break
            raise

    # ---- training ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def training(self):
        """The first harvest (with its own progress bar), the activation scales, the training progress bar
        and the op backend, around the loop of step() calls."""
        a = self.args
        self.t_train = time.perf_counter()
        self.start_step, self.harvest_s0 = self.steps_done, self.buffer.harvest_seconds
        self._first_harvest()
        self.stop = self.steps if a.stop_after is None else min(self.steps, a.stop_after)
        self.log(f"training {self.steps} steps of {a.batch} tokens ({self.steps * a.batch:,} tokens), lr {a.lr}, "
                 f"warm-up {self.warmup} steps, {a.dtype}, {self.world} rank(s)"
                 f"{f' ({a.parallel})' if self.world > 1 else ''}")
        self.bar = progress_bar(self.steps, self.log.shows_bars, initial=self.steps_done, desc="training",
                                eta=self._seconds_left)
        self.log.bar = self.bar
        self.t_loop, self.harvest_s_loop = time.perf_counter(), self.buffer.harvest_seconds
        self.time_up = False
        try:
            with use_backend(op_backend(a)):
                yield self
        finally:
            if self.bar is not None:
                self.bar.close()
            self.log.bar = self.bar = None
        self.train_seconds = time.perf_counter() - self.t_train

    def _first_harvest(self) -> None:
        """Harvest what the first step needs (the whole pool for --normalize scalar, whose scales it gives)
        under its own progress bar: the longest wait before the first step is shown as what it is."""
        with HarvestBar(self.log) as bar:
            if self.scales is None:
                if self.args.normalize == "scalar":
                    self.buffer.fill(bar)
                    self.scales = activation_scales(self.buffer.x[:self.buffer.n], self.buffer.y[:self.buffer.n])
                    bar.close()
                    self.log(f"activation scales: x * {self.scales[0]:.4g}, y * {self.scales[1]:.4g} (folded into "
                             "the saved layer)")
                else:
                    self.scales = (1.0, 1.0)
            self.buffer.prepare(self.rank_batch, bar)
        self.x_scale, self.y_scale = self.scales

    def _seconds_left(self):
        """The training's time left, harvesting counted (progress.training_eta); None before the first step."""
        done = self.steps_done - self.start_step
        if done < 1 or not self.buffer.harvested_tokens:
            return None
        harvest_in_loop = self.buffer.harvest_seconds - self.harvest_s_loop
        step_seconds = max(time.perf_counter() - self.t_loop - harvest_in_loop, 0.0) / done
        per_row = self.buffer.harvest_seconds / self.buffer.harvested_tokens
        steps_left = self.stop - self.steps_done
        return training_eta(steps_left, step_seconds, self.buffer.rows_to_harvest(steps_left, self.rank_batch),
                            per_row)

    def running(self) -> bool:
        return self.steps_done < self.stop and not self.time_up

    def step(self) -> None:
        """One optimiser step; then, when due, a logged window, the time-limit check and a checkpoint."""
        a = self.args
        x, y = self.buffer.next_batch(self.rank_batch)
        if a.normalize != "none":
            x, y = x * self.x_scale, y * self.y_scale
        loss, y_hat, values, indices = train_step(self.forward, self.layer, self.optimizer, self.scheduler, x, y)
        self.steps_done += 1
        with torch.no_grad():
            self.sums.add(loss, y_hat, y, values, self.y_scale)
            self.stats.update(values, indices)
        if self.steps_done % a.log_every == 0 or self.steps_done == self.steps:
            self.log_window()
        if self.bar is not None:
            self.bar.update(1)
        if a.time_limit is not None and self.steps_done % a.log_every == 0 and self.steps_done < self.stop:
            self.time_up = self._time_is_up()
        if a.checkpoint_every and self.steps_done % a.checkpoint_every == 0 and self.steps_done < self.stop:
            self.checkpoint()

    def log_window(self) -> dict:
        """Close a logging window: its record in the history, on the progress bar or as a log line."""
        a = self.args
        tokens_seen = self.steps_done * a.batch
        means = self.sums.close(self.device, self.world)
        window = self.stats.close_window(tokens_seen)
        elapsed = time.perf_counter() - self.t_train
        rec = {"step": self.steps_done, "tokens": tokens_seen, **means,
               "dead_fraction": self.stats.dead_fraction(tokens_seen, a.dead_window),
               "lr": self.scheduler.get_last_lr()[0],
               "tokens_per_s": (self.steps_done - self.start_step) * a.batch / max(elapsed, 1e-9), **window}
        self.history.append(rec)
        self.loggers.window(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4g}", nmse=f"{rec['nmse']:.4f}", l0=f"{rec['l0']:.1f}",
                                 dead=f"{rec['dead_fraction']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
        elif self.rank == 0 and not a.quiet:
            self.log(f"step {self.steps_done}/{self.steps} tokens {tokens_seen:,} loss {rec['loss']:.4g} "
                     f"nmse {rec['nmse']:.4f} l0 {rec['l0']:.1f} dead {rec['dead_fraction']:.3f} "
                     f"{rec['tokens_per_s']:.0f} tok/s")
        return rec

    def _time_is_up(self) -> bool:
        """Whether --time-limit has passed, agreed by every rank (so that all stop at the same step)."""
        over = torch.tensor(float(time.perf_counter() - self.t_train >= self.args.time_limit), device=self.device)
        if self.world > 1:
            dist.all_reduce(over, op=dist.ReduceOp.MAX)
        return bool(over)

    def checkpoint(self) -> None:
        """This rank's resume checkpoint (its shards with fsdp), written atomically."""
        layer_state, optimizer_state = local_state(self.layer, self.optimizer)
        atomic_save({"step": self.steps_done, "world": self.world, "fsdp": self.sharded, "layer": layer_state,
                     "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                     "buffer": self.buffer.state_dict(), "stats": self.stats.state_dict(),
                     "rng": torch.get_rng_state(), "history": self.history, "acc": self.sums.state_dict(),
                     "scales": (self.x_scale, self.y_scale), "warmup": self.warmup, "args": vars(self.args),
                     "wandb_run_id": self.loggers.wandb_run_id or self.wandb_run_id},
                    self.ckpt_path)

    # ---- the end -------------------------------------------------------------------------------

    def finish(self) -> dict:
        """Checkpoint; a finished run (or one that reached --time-limit) saves its layer, evaluates it and
        writes its metrics, history, firing counts and plot on rank 0. Returns the metrics ({"step", "stopped"}
        for a run stopped by --stop-after; {} on the other ranks)."""
        self.checkpoint()
        if self.args.arch == "mxd":
            self.layer.normalize_experts()
        if self.time_up:
            self.log(f"time limit of {self.args.time_limit:g} s reached at step {self.steps_done} of {self.steps} "
                     f"({self.steps_done * self.args.batch:,} tokens)")
        if not (self.steps_done >= self.steps or self.time_up):
            self.log(f"stopped at step {self.steps_done} of {self.steps}: continue with --resume")
            self.loggers.close()
            barrier(self.world)
            self.harvester.close()
            return {"step": self.steps_done, "stopped": True}
        layer = self._final_layer()
        metrics = {}
        if self.rank == 0:
            metrics = self._metrics()
            layer_io.save_layer(layer, self.out, self._run_config(), metrics)
            self._evaluate(layer, metrics)
            metrics["wall_seconds"] = time.perf_counter() - self.t_start
            layer_io.save_model_card(layer, self.out, metrics)
            self._write_results(metrics)
            self.loggers.final(metrics, self.steps_done)
            self.loggers.close()
            self._plot()
            self.log(summary(metrics, self.out, self.args.dead_window))
        barrier(self.world)
        self.harvester.close()
        if self.owns_group:
            dist.destroy_process_group()
        return metrics

    def _final_layer(self):
        """The layer to save: gathered from the shards with fsdp (on rank 0; None on the others), with the
        activation scales folded in (a copy: the checkpoint keeps the layer as trained)."""
        layer = full_layer(self.layer, self.device) if self.sharded else self.layer
        if layer is not None and (self.x_scale, self.y_scale) != (1.0, 1.0):
            layer = fold_scales(layer if self.sharded else copy.deepcopy(layer), self.x_scale, self.y_scale)
        return layer

    def _metrics(self) -> dict:
        a = self.args
        last = self.history[-1] if self.history else {}
        trained = (self.steps_done - self.start_step) * a.batch
        harvest_seconds = self.buffer.harvest_seconds - self.harvest_s0
        return {
            "arch": a.arch, "nmse": last.get("nmse"), "l0": last.get("l0"),
            "dead_fraction": self.stats.dead_fraction(self.steps_done * a.batch, a.dead_window),
            "loss": last.get("loss"), "tokens": self.steps_done * a.batch,
            "tokens_per_s": trained / max(self.train_seconds, 1e-9) if trained else None,   # None: nothing trained
            "train_seconds": self.train_seconds, "harvest_seconds": harvest_seconds,
            "layer_tokens_per_s": trained / max(self.train_seconds - harvest_seconds, 1e-9) if trained else None,
            "parameters": self.n_params, "parameter_budget": self.budget, "size": self.size, "k": a.k,
            "layer": a.layer, "d": self.d, "hidden": self.hidden if a.arch == "mxd" else None,
            "world_size": self.world, "parallel": a.parallel if self.world > 1 else None,
            "x_scale": self.x_scale, "y_scale": self.y_scale, "time_limited": self.time_up,
        }

    def _run_config(self) -> dict:
        """config.json beside the layer: the model and layer it replaces, the options, the corpus."""
        a = self.args
        return {"model": {"name": a.model or f"embedded:{D.embedded_model_path().name}", "layer": a.layer,
                          "d": self.d, "mlp_hidden": self.dims["hidden"], "mlp_activation": self.dims["activation"],
                          "mlp_gated": self.dims["glu"]},
                "train": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(a).items()},
                "corpus": self.corpus}

    def _held_out_contexts(self):
        """The held-out contexts of the CE evaluation, or None (none asked for, or no held-out text), said why."""
        a = self.args
        if a.eval_tokens <= 0:
            return None
        if _no_documents("--eval-text", self.eval_docs):
            self.log("no held-out documents (give --eval-text): no CE evaluation")
            return None
        n_ctx = max(1, a.eval_tokens // a.context)
        contexts = D.held_out_contexts(self.eval_docs, self.tokenizer, a.context, n_ctx)
        if contexts.shape[0] == 0:
            self.log(f"the held-out text is shorter than one context of {a.context} tokens: no CE evaluation")
            return None
        if contexts.shape[0] < n_ctx:
            self.log(f"the held-out text has {contexts.shape[0]} contexts of {a.context} tokens, not the "
                     f"{n_ctx} --eval-tokens asks for: evaluating on those (each token once)")
        return contexts

    def _evaluate(self, layer, metrics: dict) -> None:
        contexts = self._held_out_contexts()
        if contexts is None:
            return
        self.log(f"evaluating on {contexts.shape[0]} held-out contexts of {self.args.context} tokens")
        t_eval = time.perf_counter()
        with use_backend(op_backend(self.args)):
            metrics.update(evaluate(self.model, layer, self.args.layer, contexts, batch=self.args.eval_batch,
                                    progress=self.log.shows_bars))
        metrics["eval_seconds"] = time.perf_counter() - t_eval

    def _write_results(self, metrics: dict) -> None:
        write_json(self.out / METRICS_FILE, metrics)
        write_json(self.out / HISTORY_FILE, self.history, indent=None)
        atomic_save({"firing_counts": self.stats.total.cpu()}, self.out / FIRING_FILE)

    def _plot(self) -> None:
        a = self.args
        if a.no_plot:
            return
        title = plot_title(a.arch, a.k, self.size, a.layer, a.model or "the embedded SmolLM2-135M-Instruct",
                           self.steps_done * a.batch)
        if not plot_history(self.history, self.out / PLOT_FILE, title, unit_name(a.arch), a.dead_window,
                            a.log_every * a.batch):
            self.log("matplotlib is not installed: no training_curve.png")


def _documents(option: str, paths, args) -> tuple:
    """(documents, description) of the files, folders or dataset `paths` (corpus.read_text, as --text-format,
    --text-column and --text-split say), or SystemExit naming the option when they cannot be read."""
    try:
        docs, description = read_text(paths, args.text_format, args.text_column, args.text_split)
    except (OSError, ValueError) as err:
        raise SystemExit(f"{option}: {err}") from None
    if option == "--eval-text" and _no_documents(option, docs):
        raise SystemExit(f"{option}: no documents in {' '.join(paths)}")
    return docs, description


def _no_documents(option: str, docs) -> bool:
    """Whether `docs` (a list, or a StreamedCorpus: its first document is read) holds no document; SystemExit
    naming the option when a dataset cannot be read."""
    if not isinstance(docs, StreamedCorpus):
        return not docs
    try:
        return docs.first() is None
    except (OSError, ValueError) as err:   # a malformed file (pyarrow's errors are ValueErrors), a bad row
        raise SystemExit(f"{option}: {err}") from None
