"""Steering a trained layer's experts (an MxD's experts, a TopK transcoder's latents), offline: the paper's
protocol, scored without a judge model.

For each run folder the trained layer is spliced into the model in place of the MLP it was trained on, and
for each chosen expert n a constant c is added to n's coefficient at every position, selected by top-k or not
(mxd_fast.steer). The model then continues a few neutral prompts (greedy, or sampling with a seed: every
expert draws with the same seed as the unsteered baseline, so c = 0 reproduces the baseline exactly).
Scores of each expert's generations:

- fluency: the clean model's (the layer not spliced) mean next-token loss of the generated tokens, nats per
  token; lower is more fluent;
- coherence: the mean pairwise cosine similarity of the generations' mean-pooled final hidden states (the
  clean model's, each minus the mean final hidden state over held-out tokens, which removes the direction all
  hidden states share); compared with the unsteered baseline's coherence;
- concept rate: the share of generated tokens that are among the expert's top promoted tokens (below), next
  to the share of the baseline's tokens that are.

The expert's promoted tokens: its output direction u_n mapped through the model's final norm and unembedding
(lm_head(norm(u_n) - norm(0)): the norm's bias, shared by every expert, taken out), the largest logits. A
transcoder latent writes its decoder row, u_n = W_dec[n]. An MxD expert writes a_n c_n * (z D), which depends
on the token through z: u_n = c_n * (z_mean D), z_mean the layer's hidden state averaged over held-out tokens.

The default scale is SCALE_MULTIPLE times the layer's typical coefficient: the mean over held-out tokens of the
token's largest coefficient.

`python -m mxd_fast.steer --help` for the command line; docs/steering.md for the outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..hooks import steer
from ..module import MxD
from ..transcoder import TopKTranscoder
from .data import Harvester, held_out_contexts, load_model
from .evaluate import spliced
from .generation import (generate, mean_pairwise_cosine, prompt_token_ids, score_generations,
                         special_token_ids)
from .layer_io import load_layer
from .progress import progress_bar
from .run_folders import (RunFolder, agreed_model_and_layer, context_length, final_norm, firing_counts,
                          held_out_documents, read_run_folder, trained_tokens)

DEFAULT_PROMPTS = ("I think that", "The", "In my opinion,", "Here is")
DEFAULT_TOP, DEFAULT_TOKENS, DEFAULT_TOP_TOKENS, DEFAULT_EVAL_TOKENS = 50, 24, 10, 4096
SCALE_MULTIPLE = 16.0
TABLE_JSON, TABLE_MD, GENERATIONS_JSON, PLOT_FILE = "steer.json", "steer.md", "generations.json", \
    "coherence_vs_fluency.png"


# ---- the layer's coefficients and output directions -------------------------------------------

def layer_width(layer: nn.Module) -> int:
    """Experts (MxD) or latents (transcoder)."""
    if isinstance(layer, MxD):
        return layer.n_experts
    if isinstance(layer, TopKTranscoder):
        return layer.width
    raise TypeError(f"expected an MxD or a TopKTranscoder, got {type(layer).__name__}")


@torch.no_grad()
def coefficients(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(values, indices, z) of the layer at inputs x [tokens, d_in]: the selected coefficients and, for an
    MxD, its hidden state z (None for a transcoder)."""
    p = next(layer.parameters())
    x = x.to(device=p.device, dtype=p.dtype)
    if isinstance(layer, MxD):
        z, values, indices = layer.encode(x)
        return values, indices, z
    values, indices = layer.encode(x)
    return values, indices, None


class LayerMeans:
    """Sums over held-out tokens: the largest coefficient of each token (the typical coefficient) and an
    MxD's hidden state z (its mean gives the experts' output directions)."""

    def __init__(self):
        self.tokens, self.top_sum, self.z_sum = 0, 0.0, None

    def add(self, values: Tensor, z: Optional[Tensor]) -> None:
        self.tokens += values.shape[0]
        self.top_sum += float(values.max(-1).values.double().sum()) if values.shape[-1] else 0.0
        if z is not None:
            s = z.double().sum(0)
            self.z_sum = s if self.z_sum is None else self.z_sum + s

    @property
    def typical_coefficient(self) -> float:
        return self.top_sum / self.tokens if self.tokens else float("nan")

    @property
    def z_mean(self) -> Optional[Tensor]:
        return None if self.z_sum is None else (self.z_sum / max(self.tokens, 1)).float()


@torch.no_grad()
def expert_directions(layer: nn.Module, experts: Sequence[int], z_mean: Optional[Tensor]) -> Tensor:
    """[E, d_out] output directions of the experts: W_dec[n] (transcoder), c_n * (z_mean D) (MxD)."""
    ids = torch.as_tensor(list(experts), dtype=torch.long, device=next(layer.parameters()).device)
    if isinstance(layer, MxD):
        if z_mean is None:
            raise ValueError("an MxD expert's output direction needs the mean hidden state z_mean")
        return layer.experts[ids] * (z_mean.to(layer.decoder) @ layer.decoder)
    return layer.decoder[ids]


@torch.no_grad()
def promoted_tokens(model: nn.Module, directions: Tensor, count: int, lowest: bool = False,
                    chunk: int = 256) -> Tensor:
    """[E, count] token ids with the largest (lowest: smallest) logits lm_head(norm(u) - norm(0)) of each
    direction u, in chunks of experts (never an [E, vocabulary] block for all E at once)."""
    norm, head = final_norm(model), model.get_output_embeddings()
    weight = head.weight
    zero = norm(torch.zeros(1, directions.shape[1], device=weight.device, dtype=weight.dtype))
    out = []
    for start in range(0, directions.shape[0], chunk):
        u = directions[start:start + chunk].to(device=weight.device, dtype=weight.dtype)
        logits = head(norm(u) - zero).float()
        out.append(logits.topk(min(count, logits.shape[-1]), dim=-1, largest=not lowest).indices.cpu())
    return torch.cat(out) if out else torch.zeros(0, count, dtype=torch.long)


# ---- the held-out reference pass --------------------------------------------------------------

@dataclass
class Reference:
    """From held-out tokens: per layer its LayerMeans; the clean model's mean final hidden state."""
    means: list
    hidden_mean: Tensor


@torch.no_grad()
def reference_pass(model: nn.Module, layer_index: int, layers: Sequence[nn.Module], contexts: Tensor,
                   batch: int = 8) -> Reference:
    """One clean forward pass over the held-out contexts: each layer's LayerMeans at the MLP's inputs and the
    model's mean final hidden state."""
    means = [LayerMeans() for _ in layers]
    hidden_sum, count = None, 0
    device = next(model.parameters()).device
    with Harvester(model, layer_index) as harvester:
        for i in range(0, contexts.shape[0], batch):
            out, (x, _) = harvester.run_and_capture(contexts[i:i + batch].to(device), output_hidden_states=True)
            h = out.hidden_states[-1].reshape(-1, out.hidden_states[-1].shape[-1]).double()
            hidden_sum = h.sum(0) if hidden_sum is None else hidden_sum + h.sum(0)
            count += h.shape[0]
            for layer, m in zip(layers, means):
                values, _, z = coefficients(layer, x)
                m.add(values, z)
    return Reference(means, (hidden_sum / max(count, 1)).float().cpu())


# ---- steering ---------------------------------------------------------------------------------

@dataclass
class Sampling:
    """How generations are made: new tokens per prompt, temperature (0: greedy) and seed."""
    tokens: int = DEFAULT_TOKENS
    temperature: float = 0.0
    seed: int = 0


def steered_generations(model: nn.Module, tokenizer, layer: nn.Module, layer_index: int, experts: Sequence[int],
                        scale: float, prompts: Sequence[list], sampling: Sampling, progress=None) -> dict:
    """{None: baseline token ids [P, tokens], expert: steered token ids [P, tokens]}: the layer spliced into
    the model, unsteered, then each expert steered by +scale at every position."""
    suppress = special_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kwargs = dict(temperature=sampling.temperature, seed=sampling.seed, suppress=suppress, pad_id=pad)
    out = {}
    with spliced(model, layer_index, layer):
        out[None] = generate(model, prompts, sampling.tokens, **kwargs)
        for expert in experts:
            with steer(layer, expert=int(expert), scale=float(scale)):
                out[int(expert)] = generate(model, prompts, sampling.tokens, **kwargs)
            if progress is not None:
                progress.update(1)
    return out


class TokenText:
    """Each token id's text (decoded alone), cached; `normal(id)`: stripped and lower-cased, for matching."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        token = int(token)
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token])
        return self.cache[token]

    def normal(self, token: int) -> str:
        return self(token).strip().lower()


def concept_rate(generated: Tensor, concept: set, text: TokenText) -> float:
    """The share of the generated tokens whose normal text is in `concept` (a set of normal texts)."""
    tokens = generated.reshape(-1).tolist()
    return sum(text.normal(t) in concept for t in tokens) / max(len(tokens), 1)


def concept_of(top_ids: Sequence[int], text: TokenText) -> set:
    """The normal texts of an expert's promoted tokens, without those that are only spaces."""
    return {text.normal(t) for t in top_ids} - {""}


@dataclass
class Scored:
    """The scores of one set of generations (one per prompt)."""
    fluency: float
    coherence: float
    losses: list = field(default_factory=list)


def score(model: nn.Module, prompts: Sequence[list], generated: Tensor, hidden_mean: Tensor, pad_id: int) -> Scored:
    """Fluency (the clean model's mean loss of the generated tokens) and coherence (the mean pairwise cosine of
    the pooled final hidden states, centred on the held-out mean) of the generations [P, tokens]."""
    losses, pooled = score_generations(model, prompts, generated, pad_id)
    return Scored(float(losses.mean()), mean_pairwise_cosine(pooled, hidden_mean), losses.tolist())


# ---- one run ----------------------------------------------------------------------------------

def frequencies(run: RunFolder, counts: Optional[Tensor], k: int) -> Optional[Tensor]:
    """Each expert's firing frequency in training (its count over the tokens trained on), or None."""
    if counts is None:
        return None
    tokens = trained_tokens(run) or int(counts.sum()) // max(k, 1)
    return counts.double() / max(tokens, 1)


def choose_experts(counts: Optional[Tensor], top: int, chosen: Sequence[int]) -> dict:
    """{expert: why}: the `top` most frequently firing experts (ties: the lower id; never one that did not
    fire), then the chosen ones not among them."""
    picked = {}
    if top > 0 and counts is not None:
        order = sorted(range(counts.shape[0]), key=lambda n: (-int(counts[n]), n))
        picked = {n: "firing frequency" for n in order[:top] if counts[n] > 0}
    return {**picked, **{n: "--experts" for n in chosen if n not in picked}}


def expert_record(expert: int, scored: Scored, base: Scored, rates: tuple, top_ids, text: TokenText,
                  frequency: Optional[float], chosen_by: str) -> dict:
    """One row of the per-expert table."""
    return {"expert": expert, "chosen_by": chosen_by, "firing_frequency": frequency,
            "fluency": scored.fluency, "fluency_change": scored.fluency - base.fluency,
            "coherence": scored.coherence, "coherence_change": scored.coherence - base.coherence,
            "concept_rate": rates[0], "baseline_concept_rate": rates[1],
            "top_tokens": [text(t) for t in top_ids]}


def summarise(record: dict) -> dict:
    """Means over a run's steered experts."""
    rows = record["experts"]
    mean = (lambda key: sum(r[key] for r in rows) / len(rows) if rows else float("nan"))
    keys = ("fluency", "fluency_change", "coherence", "coherence_change", "concept_rate", "baseline_concept_rate")
    summary = {f"mean_{key}": mean(key) for key in keys}
    summary["experts"] = len(rows)
    summary["concept_rate_rose"] = (sum(r["concept_rate"] > r["baseline_concept_rate"] for r in rows) / len(rows)
                                    if rows else float("nan"))
    return summary


def steer_run(model: nn.Module, tokenizer, run: RunFolder, layer: nn.Module, means: LayerMeans,
              hidden_mean: Tensor, plan: "Plan", progress=None) -> tuple[dict, dict]:
    """(record, generations) of one run: its experts steered, scored and compared with its baseline."""
    counts = firing_counts(run)
    reasons = choose_experts(counts, plan.top, plan.experts)
    experts = list(reasons)
    freq = frequencies(run, counts, layer.k)
    scale = plan.scale if plan.scale is not None else SCALE_MULTIPLE * means.typical_coefficient
    if not math.isfinite(scale):
        raise ValueError(f"{run.folder}: no finite default scale (the layer's typical coefficient is "
                         f"{means.typical_coefficient}): pass --scale")
    prompts = prompt_token_ids(tokenizer, plan.prompts)
    runs = steered_generations(model, tokenizer, layer, run.layer_index, experts, scale, prompts, plan.sampling,
                               progress)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    text = TokenText(tokenizer)
    top = promoted_tokens(model, expert_directions(layer, experts, means.z_mean), plan.top_tokens) \
        if experts else torch.zeros(0, plan.top_tokens, dtype=torch.long)
    base = score(model, prompts, runs[None], hidden_mean, pad)
    rows = []
    for expert, top_ids in zip(experts, top.tolist()):
        concept = concept_of(top_ids, text)
        rates = (concept_rate(runs[expert], concept, text), concept_rate(runs[None], concept, text))
        rows.append(expert_record(expert, score(model, prompts, runs[expert], hidden_mean, pad), base, rates,
                                  top_ids, text, None if freq is None else float(freq[expert]), reasons[expert]))
    record = {"folder": str(run.folder), "arch": run.arch, "size": run.size, "k": layer.k, "scale": scale,
              "scale_rule": ("--scale" if plan.scale is not None
                             else f"{SCALE_MULTIPLE:g} x the typical coefficient {means.typical_coefficient:.4g}"),
              "typical_coefficient": means.typical_coefficient,
              "baseline": {"fluency": base.fluency, "coherence": base.coherence}, "experts": rows}
    record["summary"] = summarise(record)
    decode = (lambda ids: [tokenizer.decode(row) for row in ids.tolist()])
    generations = {"baseline": decode(runs[None]), "experts": {str(e): decode(runs[e]) for e in experts}}
    return record, generations


# ---- the outputs ------------------------------------------------------------------------------

def _cell(value, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    """The per-expert tables of every run and, with several runs, the summary comparing them."""
    lines = [f"# Steering: layer {report['layer']} of {report['model']}", "",
             f"Prompts: {', '.join(repr(p) for p in report['prompts'])}; {report['sampling']['tokens']} new tokens, "
             f"{'greedy' if report['sampling']['temperature'] == 0 else 'sampled'}. Fluency: the clean model's loss "
             "of the generated tokens (nats, lower is more fluent); coherence: mean pairwise cosine of the "
             "generations' centred final hidden states; concept: share of generated tokens among the expert's "
             "promoted tokens (baseline: the same tokens in the unsteered generations).", ""]
    if len(report["runs"]) > 1:
        lines += ["## Summary (means over the steered experts)", "",
                  "| run | experts | scale | fluency (baseline) | coherence (baseline) | concept rate (baseline) |",
                  "|---|---|---|---|---|---|"]
        for r in report["runs"]:
            s = r["summary"]
            lines.append(f"| {r['arch']} ({r['folder']}) | {s['experts']} | {_cell(r['scale'])} | "
                         f"{_cell(s['mean_fluency'])} ({_cell(r['baseline']['fluency'])}) | "
                         f"{_cell(s['mean_coherence'])} ({_cell(r['baseline']['coherence'])}) | "
                         f"{_cell(s['mean_concept_rate'])} ({_cell(s['mean_baseline_concept_rate'])}) |")
        lines.append("")
    for r in report["runs"]:
        lines += [f"## {r['arch']}: {r['folder']}", "",
                  f"{r['size']} experts, k = {r['k']}; scale {_cell(r['scale'], 4)} ({r['scale_rule']}); baseline "
                  f"fluency {_cell(r['baseline']['fluency'])}, coherence {_cell(r['baseline']['coherence'])}.", "",
                  "| expert | frequency | fluency | Δ fluency | coherence | Δ coherence | concept | baseline "
                  "concept | promoted tokens |", "|---" * 9 + "|"]
        for e in r["experts"]:
            tokens = " ".join(repr(t) for t in e["top_tokens"][:6]).replace("|", "\\|")
            lines.append(f"| {e['expert']} | {_cell(e['firing_frequency'])} | {_cell(e['fluency'])} | "
                         f"{_cell(e['fluency_change'])} | {_cell(e['coherence'])} | {_cell(e['coherence_change'])} | "
                         f"{_cell(e['concept_rate'])} | {_cell(e['baseline_concept_rate'])} | {tokens} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Coherence against fluency: one point per steered expert, a star per run's unsteered baseline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for i, r in enumerate(report["runs"]):
        color = f"C{i}"
        xs = [e["fluency"] for e in r["experts"]]
        ys = [e["coherence"] for e in r["experts"]]
        ax.scatter(xs, ys, s=18, alpha=0.7, color=color, label=f"{r['arch']} (scale {r['scale']:.3g})")
        ax.scatter([r["baseline"]["fluency"]], [r["baseline"]["coherence"]], s=160, marker="*", color=color,
                   edgecolor="black", label=f"{r['arch']} unsteered")
    ax.set_xlabel("fluency: clean model's loss of the generated tokens (nats/token, lower is better)")
    ax.set_ylabel("coherence: mean pairwise cosine of the generations")
    ax.set_title(f"steering, layer {report['layer']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict, generations: dict, out: Path) -> dict:
    """steer.json, steer.md, generations.json and coherence_vs_fluency.png in `out`; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / TABLE_JSON, "markdown": out / TABLE_MD, "generations": out / GENERATIONS_JSON,
             "plot": out / PLOT_FILE}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(markdown(report))
    paths["generations"].write_text(json.dumps({"prompts": report["prompts"], "runs": generations}, indent=2) + "\n")
    plot(report, paths["plot"])
    return paths


# ---- the command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxd_fast.steer", description=(
        "Steer a trained layer's experts (MxD experts, TopK transcoder latents) and score the generations "
        "offline: fluency, coherence and concept rate against the unsteered baseline (docs/steering.md)."))
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER", help="run folders (python -m mxd_fast.train) trained "
                   "on the same model and layer")
    p.add_argument("--experts", default="", help="comma-separated expert ids to steer as well (default: none)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help="steer each run's TOP most frequently firing "
                   f"experts, from its firing_counts.pt; 0: only --experts (default: {DEFAULT_TOP})")
    p.add_argument("--scale", default="auto", help="the constant added to the expert's coefficient at every "
                   f"position; auto: {SCALE_MULTIPLE:g} x the layer's mean largest coefficient per held-out token "
                   "(default: auto)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help=f"new tokens per prompt (default: "
                   f"{DEFAULT_TOKENS})")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="at least 2 prompts (default: "
                   + ", ".join(repr(t) for t in DEFAULT_PROMPTS) + ")")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above 0: sampling with --seed "
                   "(default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling, the same for every expert (default: 0)")
    p.add_argument("--top-tokens", type=int, default=DEFAULT_TOP_TOKENS, help="promoted tokens per expert that "
                   f"count as its concept (default: {DEFAULT_TOP_TOKENS})")
    p.add_argument("--text", nargs="+", default=None, help="held-out text files or folders for the layer's "
                   "typical coefficient and mean hidden state (default: the first run's held-out documents)")
    p.add_argument("--eval-tokens", type=int, default=DEFAULT_EVAL_TOKENS, help="held-out tokens read "
                   f"(default: {DEFAULT_EVAL_TOKENS})")
    p.add_argument("--batch", type=int, default=8, help="held-out contexts per forward pass (default: 8)")
    p.add_argument("--out", default=None, help="output folder (default: the first run folder's steer/)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    return p


@dataclass
class Plan:
    """The command line, checked."""
    runs: list
    model: Optional[str]
    layer_index: int
    experts: list
    top: int
    scale: Optional[float]
    prompts: list
    sampling: Sampling
    top_tokens: int
    eval_tokens: int
    batch: int
    text: Optional[list]
    out: Path
    device: torch.device


def parse_expert_ids(spec: str, option: str = "--experts") -> list:
    """Distinct non-negative ids from a comma-separated list (empty: none)."""
    try:
        ids = [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{option}: {spec!r} is not a comma-separated list of expert ids") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"{option}: {spec!r}: give distinct expert ids >= 0")
    return ids


def parse_scale(spec: str, option: str = "--scale") -> Optional[float]:
    """None for auto, else a finite number."""
    if str(spec).strip().lower() == "auto":
        return None
    try:
        value = float(spec)
    except ValueError:
        raise ValueError(f"{option} must be a finite number or auto, got {spec!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{option} must be a finite number or auto, got {spec!r}")
    return value


def _check_numbers(args) -> None:
    for option in ("tokens", "top_tokens", "eval_tokens", "batch"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    if args.top < 0:
        raise ValueError(f"--top must be >= 0, got {args.top}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if len(args.prompts) < 2 or any(not p.strip() for p in args.prompts):
        raise ValueError(f"--prompts: give at least 2 prompts that are not blank (coherence compares an expert's "
                         f"generations), got {args.prompts!r}")


def resolve(args) -> Plan:
    """Everything the command line asks for, checked by name before any model is loaded."""
    from .layer_io import usable_device
    _check_numbers(args)
    experts, scale = parse_expert_ids(args.experts), parse_scale(args.scale)
    runs = [read_run_folder(folder) for folder in args.runs]
    model, layer_index = agreed_model_and_layer(runs)
    for run in runs:
        bad = [n for n in experts if n >= run.size]
        if bad:
            raise ValueError(f"--experts {','.join(map(str, bad))}: out of range for RUN_FOLDER {run.folder}, "
                             f"whose layer has {run.size} experts (0 .. {run.size - 1})")
        if args.top > 0 and firing_counts(run) is None:
            raise FileNotFoundError(f"RUN_FOLDER {run.folder} has no firing_counts.pt (training writes it at its "
                                    "end) to choose the --top experts from: pass --experts ids and --top 0")
    if not experts and args.top == 0:
        raise ValueError("--top 0 and no --experts: no expert to steer")
    try:
        device = usable_device(args.device, "--device")
    except ValueError as err:
        raise ValueError(str(err)) from None
    out = Path(args.out) if args.out is not None else runs[0].folder / "steer"
    return Plan(runs, model, layer_index, experts, args.top, scale, list(args.prompts),
                Sampling(args.tokens, args.temperature, args.seed), args.top_tokens, args.eval_tokens, args.batch,
                args.text, out, device)


def load_layers(plan: Plan, model: nn.Module) -> list:
    """The runs' layers on the plan's device, in eval mode, checked against the model's width."""
    width = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    layers = []
    for run in plan.runs:
        layer = load_layer(run.folder, device=plan.device).eval()
        layer_width(layer)
        if width is not None and layer.d_in != width:
            raise ValueError(f"RUN_FOLDER {run.folder}: the layer takes inputs of width {layer.d_in}, the model's "
                             f"blocks are {width} wide")
        layers.append(layer)
    return layers


def reference_contexts(plan: Plan, tokenizer) -> Tensor:
    """The held-out contexts of the reference pass (the first run's held-out text, or --text)."""
    run = plan.runs[0]
    docs, _ = held_out_documents(run, plan.text, log=lambda m: print(m, file=sys.stderr))
    context = context_length(run)
    contexts = held_out_contexts(docs, tokenizer, context, max(1, -(-plan.eval_tokens // context)))
    if contexts.shape[0] == 0:
        raise ValueError(f"the held-out text is shorter than one context of {context} tokens: pass --text FILES")
    return contexts


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """The command line: returns the report (also written to the output folder)."""
    plan = resolve(build_parser().parse_args(argv))
    model, tokenizer = load_model(plan.model, device=plan.device)
    layers = load_layers(plan, model)
    reference = reference_pass(model, plan.layer_index, layers, reference_contexts(plan, tokenizer), plan.batch)
    report = {"model": plan.model or "embedded SmolLM2-135M-Instruct", "layer": plan.layer_index,
              "prompts": plan.prompts, "sampling": vars(plan.sampling), "top_tokens": plan.top_tokens,
              "method": __doc__.split("`python -m")[0].strip(), "runs": []}
    generations = {}
    counts = [len(choose_experts(firing_counts(r), plan.top, plan.experts)) for r in plan.runs]
    bar = progress_bar(sum(counts), True, unit="expert", desc="steering")
    try:
        for run_folder, layer, means in zip(plan.runs, layers, reference.means):
            record, generations[str(run_folder.folder)] = steer_run(model, tokenizer, run_folder, layer, means,
                                                                   reference.hidden_mean, plan, bar)
            report["runs"].append(record)
    finally:
        if bar is not None:
            bar.close()
    paths = write_outputs(report, generations, plan.out)
    print(markdown(report))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return report
