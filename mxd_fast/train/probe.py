"""Sparse probing of a trained layer's features (SAEBench's k-sparse probing), offline.

For every text of a labelled data set (mxd_fast.train.probe_data: ``lang``, ``code``, ``topic``) the
language model runs up to the MLP of one layer (the forward pass stops there). Four feature sets are
read at every token and mean-pooled over the text's tokens:

- ``mxd``: an MxD layer's N expert coefficients (``layer.encode(x)`` -> ``(z, values, indices)``, x the
  MLP's input);
- ``transcoder``: a TopK transcoder's latents (``layer.encode(x)`` -> ``(values, indices)``);
- ``mlp_neurons``: the model MLP's own hidden activations, the input of its output projection
  (``act(gate_proj(x)) * up_proj(x)`` for a SwiGLU MLP), read by a forward pre-hook on ``down_proj``;
- ``residual``: the MLP's input x itself (the residual stream after the block's pre-MLP norm).

Each text is tokenised without special tokens, cut to ``max_tokens`` tokens and preceded by the
end-of-text token (the document separator the layers were trained with); pooling covers the text's own
tokens, not that separator. The sparse coefficients are pooled by a scatter-add of each token's K
values into a dense [texts, N] block; no dense [tokens, N] tensor is formed.

Probing, as SAEBench does it, one-vs-rest per class: a binary task "class c vs the rest", balanced
(all training texts of c; as many negatives, ceil(n / (C - 1)) drawn from each other class with the seed,
then n of those), the same on the test split. The k features with the largest absolute difference
between the two means on the training split are kept, a logistic regression (scikit-learn, L2, C = 1,
1000 iterations, features as they are) is fitted on those k features only, and its test accuracy is
recorded (chance: 0.5). A data set's accuracy at k is the mean over its classes. A k larger than a
feature set's width is not run (reported as n/a).

`python -m mxd_fast.probe --help` for the command line; results go to results.json, results.md and
accuracy_vs_k.png in the output folder.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from mxd_fast.harvest import load_model
from mxd_fast.module import MxD
from mxd_fast.train import load_layer
from mxd_fast.train.models import adapt
from mxd_fast.train.probe_data import (CHUNK_CHARS, DATASETS, TEST_FRACTION, ProbeDataset, build_dataset,
                                       check_sizes, parse_dataset_names)
from mxd_fast.transcoder import TopKTranscoder

DEFAULT_KS = (1, 2, 5, 10, 20)
DEFAULT_TEXTS_PER_CLASS = 100
DEFAULT_MAX_TOKENS = 128
OUTPUT_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc2", "w2", "fc_out")
RESULTS_JSON, RESULTS_MD, PLOT_FILE = "results.json", "results.md", "accuracy_vs_k.png"


# ---- pooling ---------------------------------------------------------------------------------

def pool_sparse(values: Tensor, indices: Tensor, mask: Tensor, width: int) -> Tensor:
    """Mean over the masked tokens of K-sparse coefficients: values, indices [B, T, K], mask [B, T]
    (True where a token counts) -> dense [B, width] float32, by a scatter-add (no [B, T, width] tensor)."""
    if values.shape != indices.shape or values.shape[:2] != mask.shape:
        raise ValueError(f"values {tuple(values.shape)}, indices {tuple(indices.shape)} and mask "
                         f"{tuple(mask.shape)} do not match ([B, T, K], [B, T, K], [B, T])")
    batch = values.shape[0]
    weights = values.float() * mask[..., None].float()
    rows = torch.arange(batch, device=values.device).view(batch, 1, 1).expand_as(indices)
    flat = (rows * width + indices.long()).reshape(-1)
    pooled = torch.zeros(batch * width, device=values.device).index_add_(0, flat, weights.reshape(-1))
    return pooled.view(batch, width) / mask.sum(1, keepdim=True).clamp_min(1).float()


def pool_dense(acts: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked tokens: acts [B, T, D], mask [B, T] -> [B, D] float32."""
    summed = (acts.float() * mask[..., None].float()).sum(1)
    return summed / mask.sum(1, keepdim=True).clamp_min(1).float()


# ---- reading activations ---------------------------------------------------------------------

class _StopAfterMLP(Exception):
    pass


def output_projection(mlp: nn.Module) -> Optional[nn.Module]:
    """The MLP's last linear map (its input is the MLP's hidden activations), if named as usual."""
    for name in OUTPUT_PROJECTIONS:
        module = getattr(mlp, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


class MLPTaps:
    """Forward pre-hooks on one block's MLP input (x) and on the MLP's output projection (the hidden
    activations), and a forward hook that stops the model's forward pass after that MLP. For an MLP that is
    parts of a larger module (OPT's fc1 -> act -> fc2, BERT, BLOOM, MPT) the hooks sit on those parts."""

    def __init__(self, model: nn.Module, layer: int, want_hidden: bool):
        self.model = model
        site = adapt(model).mlp(layer)
        first, last = site.read_points()
        self.x: Optional[Tensor] = None
        self.hidden: Optional[Tensor] = None
        self.handles = [first.register_forward_pre_hook(self._take_x, with_kwargs=True),
                        last.register_forward_hook(self._stop)]
        if want_hidden:
            # the parts kind: `last` is the output map itself; otherwise the MLP's named output projection
            projection = last if site.parts is not None else output_projection(last)
            if projection is None:
                self.close()
                raise ValueError(f"the MLP of layer {layer} ({type(last).__name__}) has no output projection named "
                                 f"{' / '.join(OUTPUT_PROJECTIONS)}: its neurons cannot be read")
            self.handles.append(projection.register_forward_pre_hook(self._take_hidden))

    def _take_x(self, module, args, kwargs):
        self.x = (args[0] if args else next(iter(kwargs.values()))).detach()

    def _take_hidden(self, module, args):
        self.hidden = args[0].detach()

    def _stop(self, module, args, output):
        raise _StopAfterMLP

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    @torch.no_grad()
    def run(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(x [B, T, d], hidden [B, T, H] or None) for one padded batch."""
        self.x = self.hidden = None
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopAfterMLP:
            pass
        if self.x is None:
            raise RuntimeError("the tapped MLP did not run")
        return self.x, self.hidden


def tokenize_texts(tokenizer, texts: Sequence[str], max_tokens: int) -> list:
    """Per text: [separator] + at most max_tokens of its tokens (no other special tokens)."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if separator is None:
        raise ValueError("the tokenizer has neither an end-of-text nor a beginning-of-text token")
    out = []
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_tokens]
        if not ids:
            raise ValueError(f"a text tokenises to no token: {text[:80]!r}")
        out.append([int(separator)] + ids)
    return out


def padded_batch(token_lists: Sequence[list], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, pool_mask) [B, T], right-padded; pool_mask leaves out the separator
    (position 0) and the padding."""
    length = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    attention = torch.zeros(len(token_lists), length, dtype=torch.long)
    for row, tokens in enumerate(token_lists):
        ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
    pool = attention.bool().clone()
    pool[:, 0] = False
    return ids.to(device), attention.to(device), pool.to(device)


# ---- feature sets ----------------------------------------------------------------------------

@dataclass
class FeatureSet:
    """A named set of `width` features: pool(x, hidden, mask) -> [B, width] mean-pooled features."""
    name: str
    width: int
    pool: Callable[[Tensor, Optional[Tensor], Tensor], Tensor]
    info: dict = field(default_factory=dict)
    needs_hidden: bool = False


def layer_feature_set(name: str, layer: nn.Module) -> FeatureSet:
    """The expert coefficients of an MxD or the latents of a TopK transcoder, pooled sparsely."""
    parameter = next(layer.parameters())
    if isinstance(layer, MxD):
        width, arch = layer.n_experts, "mxd"

        def coefficients(x):
            _, values, indices = layer.encode(x)
            return values, indices
    elif isinstance(layer, TopKTranscoder):
        width, arch = layer.width, "transcoder" if layer.skip is None else "skip-transcoder"

        def coefficients(x):
            values, indices = layer.encode(x)
            return values, indices
    else:
        raise TypeError(f"{name}: expected an MxD or a TopKTranscoder, got {type(layer).__name__}")

    @torch.no_grad()
    def pool(x, hidden, mask):
        values, indices = coefficients(x.to(device=parameter.device, dtype=parameter.dtype))
        return pool_sparse(values.to(mask.device), indices.to(mask.device), mask, width)

    info = {"arch": arch, "width": width, "k": int(layer.k), "d_in": layer.d_in,
            "parameters": sum(p.numel() for p in layer.parameters())}
    return FeatureSet(name, width, pool, info)


def model_feature_sets(d: int, hidden: int) -> list:
    """The model's own MLP neurons (hidden activations) and its residual stream (the MLP's input)."""
    return [FeatureSet("mlp_neurons", hidden, lambda x, h, mask: pool_dense(h, mask),
                       {"arch": "mlp_neurons", "width": hidden}, needs_hidden=True),
            FeatureSet("residual", d, lambda x, h, mask: pool_dense(x, mask), {"arch": "residual", "width": d})]


def collect_features(model: nn.Module, tokenizer, layer: int, feature_sets: Sequence[FeatureSet],
                     texts: Sequence[str], max_tokens: int, batch_size: int, progress=None) -> dict:
    """{feature set name: float32 array [len(texts), width]}: each text's features mean-pooled over its
    tokens. Texts run in batches of similar length (results are put back in the texts' order)."""
    device = next(model.parameters()).device
    token_lists = tokenize_texts(tokenizer, texts, max_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else token_lists[0][0]
    out = {fs.name: np.zeros((len(texts), fs.width), dtype=np.float32) for fs in feature_sets}
    order = sorted(range(len(texts)), key=lambda i: (len(token_lists[i]), i))
    taps = MLPTaps(model, layer, want_hidden=any(fs.needs_hidden for fs in feature_sets))
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, attention, mask = padded_batch([token_lists[i] for i in rows], pad_id, device)
            x, hidden = taps.run(ids, attention)
            for fs in feature_sets:
                pooled = fs.pool(x, hidden, mask)
                if pooled.shape != (len(rows), fs.width):
                    raise RuntimeError(f"feature set {fs.name}: pooled features of shape {tuple(pooled.shape)}, "
                                       f"expected {(len(rows), fs.width)}")
                out[fs.name][rows] = pooled.cpu().numpy()
            if progress is not None:
                progress.update(len(rows))
    finally:
        taps.close()
    return out


# ---- probing ---------------------------------------------------------------------------------

def top_k_by_mean_difference(features: np.ndarray, binary: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k features whose means over positives (binary == 1) and negatives differ most
    in absolute value (ties: the lower index first)."""
    diff = np.abs(features[binary == 1].mean(0) - features[binary == 0].mean(0))
    return np.argsort(-diff, kind="stable")[:k]


def balanced_one_vs_rest(labels: np.ndarray, positive: int, rng: np.random.Generator) -> tuple:
    """(rows, binary): every row of class `positive` and as many negatives, ceil(n / (C - 1)) drawn from
    each other class then n of those drawn (SAEBench's balancing); rows shuffled."""
    pos = np.flatnonzero(labels == positive)
    others = [c for c in np.unique(labels) if c != positive]
    if pos.size == 0 or not others:
        raise ValueError(f"class {positive}: needs texts of its own and of another class")
    per_class = math.ceil(pos.size / len(others))
    neg = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in others])
    neg = rng.permutation(neg)[:pos.size]
    rows = np.concatenate([pos, neg])
    binary = np.concatenate([np.ones(pos.size, dtype=np.int64), np.zeros(neg.size, dtype=np.int64)])
    shuffle = rng.permutation(rows.size)
    return rows[shuffle], binary[shuffle]


def fit_logistic_probe(train_x, train_y, test_x, test_y) -> tuple:
    """(test accuracy, converged) of scikit-learn's L2 logistic regression (C = 1, 1000 iterations)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe = LogisticRegression(C=1.0, max_iter=1000).fit(train_x, train_y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return float((probe.predict(test_x) == test_y).mean()), converged


def sparse_probe(features: np.ndarray, labels, is_test, ks: Sequence[int], seed: int = 0) -> dict:
    """k-sparse probing, one-vs-rest per class: {"mean": {k: accuracy}, "per_class": {class: {k:
    accuracy}}, "unconverged_fits": count}; accuracy None where k exceeds the number of features."""
    features = np.asarray(features, dtype=np.float32)
    labels, is_test = np.asarray(labels), np.asarray(is_test, dtype=bool)
    if features.ndim != 2 or features.shape[0] != labels.shape[0] or labels.shape != is_test.shape:
        raise ValueError(f"features {features.shape}, labels {labels.shape} and is_test {is_test.shape} do not match")
    per_class, unconverged = {}, 0
    for positive in (int(c) for c in np.unique(labels)):
        rng = np.random.default_rng([seed, positive])
        train_rows, train_y = balanced_one_vs_rest(labels[~is_test], positive, rng)
        test_rows, test_y = balanced_one_vs_rest(labels[is_test], positive, rng)
        train_x, test_x = features[~is_test][train_rows], features[is_test][test_rows]
        scores = {}
        for k in ks:
            if k > features.shape[1]:
                scores[k] = None
                continue
            chosen = top_k_by_mean_difference(train_x, train_y, k)
            scores[k], converged = fit_logistic_probe(train_x[:, chosen], train_y, test_x[:, chosen], test_y)
            unconverged += not converged
        per_class[positive] = scores
    mean = {k: (None if any(s[k] is None for s in per_class.values())
                else float(np.mean([s[k] for s in per_class.values()]))) for k in ks}
    return {"mean": mean, "per_class": per_class, "unconverged_fits": unconverged}


# ---- the command line ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxd_fast.probe", description=(
        "Sparse probing (SAEBench's k-sparse probing) of a trained MxD layer's expert coefficients, a TopK "
        "transcoder's latents, the model's MLP neurons and its residual stream, on offline data sets."))
    p.add_argument("--mxd", help="run folder of an MxD layer (python -m mxd_fast.train)")
    p.add_argument("--transcoder", help="run folder of a TopK transcoder or skip-transcoder")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    p.add_argument("--model", default=None, help="the language model (default: the one the runs were trained on)")
    p.add_argument("--layer", type=int, default=None, help="the block whose MLP is read (default: the runs' layer)")
    p.add_argument("--texts-per-class", type=int, default=DEFAULT_TEXTS_PER_CLASS)
    p.add_argument("--test-fraction", type=float, default=TEST_FRACTION, help="of each class's texts, held out")
    p.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS, help="characters per text chunk")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per text, at most")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="numbers of features per probe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (default: the first run folder's probe/)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    return p


def parse_ks(spec: str) -> list:
    try:
        ks = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--ks: {spec!r} is not a comma-separated list of integers") from None
    if not ks or any(k < 1 for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"--ks: {spec!r}: give distinct integers >= 1")
    return sorted(ks)


def _check_sizes(args) -> None:
    """The size options, errors naming them as the command line spells them."""
    for option in ("max_tokens", "batch_size"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    try:
        check_sizes(args.texts_per_class, args.test_fraction, args.chunk_chars)
    except ValueError as err:
        message = str(err)
        for name in ("texts_per_class", "test_fraction", "chunk_chars"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise ValueError(message) from None


def read_run(option: str, folder: str) -> dict:
    """{"folder", "layer" (index or None), "model" (name or None), "config"} of a run folder; errors name
    the option."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"{option}: no run folder at {folder}")
    config_file = path / "config.json"
    if not config_file.is_file() or not (path / "layer.safetensors").is_file():
        raise FileNotFoundError(f"{option}: {folder} is not a run folder (it needs layer.safetensors and config.json)")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise ValueError(f"{option}: {config_file} is not JSON ({err})") from None
    model = config.get("model") if isinstance(config, dict) else None
    model = model if isinstance(model, dict) else {}
    layer = model.get("layer")
    return {"option": option, "folder": path, "layer": layer if isinstance(layer, int) else None,
            "model": model.get("name"), "config": config}


def _agreed(runs: list, key: str, given, option: str):
    """The value of `key` the runs agree on, checked against the command line's `given` (if any)."""
    known = [r for r in runs if r[key] is not None]
    for a, b in zip(known, known[1:]):
        if a[key] != b[key]:
            raise ValueError(f"{a['option']} ({key} {a[key]}) and {b['option']} ({key} {b[key]}) come from "
                             f"different {key}s: compare layers trained on the same one")
    if given is not None and known and given != known[0][key]:
        raise ValueError(f"{option} {given} differs from the {key} {known[0][key]} that {known[0]['option']} was "
                         f"trained on: leave {option} out to use it")
    return given if given is not None else (known[0][key] if known else None)


def resolve(args) -> dict:
    """Everything the command line asks for, checked by name before any model is loaded."""
    _check_sizes(args)
    datasets = parse_dataset_names(args.datasets)
    ks = parse_ks(args.ks)
    runs = [read_run(option, folder) for option, folder in (("--mxd", args.mxd), ("--transcoder", args.transcoder))
            if folder is not None]
    layer = _agreed(runs, "layer", args.layer, "--layer")
    if layer is None:
        raise ValueError("--layer is needed: " + ("no run folder is given" if not runs else
                                                   "the run folders' config.json do not say the layer"))
    if layer < 0:
        raise ValueError(f"--layer must be >= 0, got {layer}")
    model = _agreed(runs, "model", args.model, "--model")
    if isinstance(model, str) and model.startswith("embedded:"):
        model = None                                    # the trainer's name for the embedded model
    if args.out is None and not runs:
        raise ValueError("--out is needed when no run folder is given")
    out = Path(args.out) if args.out is not None else runs[0]["folder"] / "probe"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return {"datasets": datasets, "ks": ks, "runs": runs, "layer": layer, "model": model, "out": out}


def load_run_layers(plan: dict, device) -> list:
    """The run folders' layers as feature sets, each checked to be what its option names."""
    sets = []
    for run in plan["runs"]:
        layer = load_layer(run["folder"], device=device)
        wanted = MxD if run["option"] == "--mxd" else TopKTranscoder
        if not isinstance(layer, wanted):
            raise ValueError(f"{run['option']}: {run['folder']} holds a {type(layer).__name__}, "
                             f"not a {wanted.__name__}")
        sets.append(layer_feature_set(run["option"].lstrip("-"), layer.eval()))
    return sets


def model_checked_feature_sets(plan: dict, layer_sets: list, model: nn.Module) -> list:
    """layer_sets checked against the model's width, then the model's MLP neurons and residual stream."""
    from mxd_fast.harvest import model_dims

    try:
        dims = model_dims(model, plan["layer"])
    except ValueError as err:                           # no such block: the message lists the model's
        raise ValueError(f"--layer {plan['layer']}: {err}") from None
    for fs, run in zip(layer_sets, plan["runs"]):
        if fs.info["d_in"] != dims["d"]:
            raise ValueError(f"{run['option']}: the layer takes inputs of width {fs.info['d_in']}, the model's "
                             f"blocks are {dims['d']} wide")
    return list(layer_sets) + model_feature_sets(dims["d"], dims["hidden"])


# ---- the report ------------------------------------------------------------------------------

def _comparison_note(sets: Sequence[FeatureSet]) -> Optional[str]:
    """A note when the two trained layers differ in K or in parameters (by more than 1%)."""
    layers = [fs for fs in sets if "k" in fs.info]
    if len(layers) != 2:
        return None
    (a, b), notes = layers, []
    if a.info["k"] != b.info["k"]:
        notes.append(f"K {a.info['k']} vs {b.info['k']}")
    pa, pb = a.info["parameters"], b.info["parameters"]
    if abs(pa - pb) > 0.01 * max(pa, pb):
        notes.append(f"{pa:,} vs {pb:,} parameters")
    return f"{a.name} and {b.name} differ: {', '.join(notes)}" if notes else None


def assemble_report(plan: dict, args, datasets: Sequence[ProbeDataset], sets: Sequence[FeatureSet],
                    results: dict) -> dict:
    """The JSON report: settings, data sets, feature sets and accuracies (keys of k as strings)."""
    accuracy = {}
    for ds in datasets:
        accuracy[ds.name] = {}
        for fs in sets:
            r = results[ds.name][fs.name]
            accuracy[ds.name][fs.name] = {
                "mean": {str(k): v for k, v in r["mean"].items()},
                "per_class": {ds.classes[c]: {str(k): v for k, v in s.items()} for c, s in r["per_class"].items()},
                "unconverged_fits": r["unconverged_fits"]}
    return {
        "method": "k-sparse probing as in SAEBench: one-vs-rest per class on balanced binary tasks, the k features "
                  "with the largest absolute difference of class means on the training split, L2 logistic "
                  "regression (C=1, 1000 iterations); test accuracy, mean over classes (chance 0.5); features "
                  "mean-pooled over each text's tokens",
        "model": plan["model"] or "embedded", "layer": plan["layer"], "ks": plan["ks"],
        "settings": {key: getattr(args, key) for key in ("texts_per_class", "test_fraction", "chunk_chars",
                                                          "max_tokens", "batch_size", "seed", "device")},
        "runs": {r["option"].lstrip("-"): str(r["folder"]) for r in plan["runs"]},
        "datasets": {ds.name: ds.describe() for ds in datasets},
        "feature_sets": {fs.name: fs.info for fs in sets},
        "comparison_note": _comparison_note(sets),
        "accuracy": accuracy,
    }


def markdown_table(report: dict) -> str:
    ks = report["ks"]
    lines = [f"# Sparse probing: layer {report['layer']} of {report['model']}", "",
             "Test accuracy, mean over one-vs-rest tasks (chance 0.5), by the number k of features probed.", ""]
    if report["comparison_note"]:
        lines += [f"Note: {report['comparison_note']}.", ""]
    for name, ds in report["datasets"].items():
        per_class = ds["test"] // len(ds["classes"])
        lines += [f"## {name}: {len(ds['classes'])} classes ({', '.join(ds['classes'])}), "
                  f"{ds['train'] // len(ds['classes'])} training and {per_class} test texts per class", "",
                  "| features | width | K | parameters | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---" * (4 + len(ks)) + "|"]
        for fs_name, acc in report["accuracy"][name].items():
            info = report["feature_sets"][fs_name]
            cells = ["n/a" if acc["mean"][str(k)] is None else f"{acc['mean'][str(k)]:.3f}" for k in ks]
            parameters = f"{info['parameters']:,}" if "parameters" in info else ""
            lines.append(f"| {fs_name} | {info['width']} | {info.get('k', '')} | {parameters} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(report: dict, path: Path) -> None:
    """Accuracy against k, one line per feature set, one panel per data set."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for fs_name, acc in report["accuracy"][name].items():
            points = [(k, acc["mean"][str(k)]) for k in report["ks"] if acc["mean"][str(k)] is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=fs_name)
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
        ax.set_ylim(min(0.45, ax.get_ylim()[0]), 1.02)
        ax.set_xscale("log")
        ax.set_xticks(report["ks"], [str(k) for k in report["ks"]])
        ax.minorticks_off()
        ax.set_title(name)
        ax.set_xlabel("k (features per probe)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sparse probing, layer {report['layer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> dict:
    """results.json, results.md and accuracy_vs_k.png in `out`; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "markdown": out / RESULTS_MD, "plot": out / PLOT_FILE}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    plot_accuracy(report, paths["plot"])
    return paths


def _progress_bar(total: int):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="reading features", unit="text")


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """The command line: returns the report (also written to the output folder)."""
    args = build_parser().parse_args(argv)
    plan = resolve(args)
    layer_sets = load_run_layers(plan, args.device)
    datasets = [build_dataset(name, args.texts_per_class, args.seed, args.test_fraction, args.chunk_chars)
                for name in plan["datasets"]]
    model, tokenizer = load_model(plan["model"], device=args.device)
    sets = model_checked_feature_sets(plan, layer_sets, model)
    note = _comparison_note(sets)
    if note:
        print(f"note: not an equal comparison: {note}", file=sys.stderr)
    progress = _progress_bar(sum(len(ds.texts) for ds in datasets))
    try:
        features = {ds.name: collect_features(model, tokenizer, plan["layer"], sets, ds.texts, args.max_tokens,
                                              args.batch_size, progress) for ds in datasets}
    finally:
        if progress is not None:
            progress.close()
    results = {ds.name: {fs.name: sparse_probe(features[ds.name][fs.name], ds.labels, ds.is_test, plan["ks"],
                                               args.seed) for fs in sets} for ds in datasets}
    report = assemble_report(plan, args, datasets, sets, results)
    paths = write_outputs(report, plan["out"])
    print(markdown_table(report))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return report
