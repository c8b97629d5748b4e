"""A self-contained HTML report of a trained layer (python -m mxd_fast.inspect): one index.html that opens
offline, its style, script and data inline.

What it shows, for an MxD layer's experts or a TopK transcoder's latents alike:

- the firing-frequency histogram (log10; training's firing_counts.pt, else the held-out text) and the dead
  experts (never fired);
- per expert, found by id or by token with the search box (or the address #expert=5, #q=text): its top
  activating contexts in held-out text, tokens shaded by the expert's coefficient; its firing frequency and
  mean coefficient when firing; the tokens it promotes and suppresses most through the model's final norm and
  unembedding (mxd_fast.train.steer.promoted_tokens: an MxD expert's direction at the mean hidden state); and,
  for the most frequently firing experts, a few steered generations (mxd_fast.train.steer).

The held-out text streams past in batches: the contexts are kept as a top-n per expert (TopContexts), never a
dense [tokens, experts] tensor.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .data import Harvester, held_out_contexts, load_model
from .layer_io import load_layer, usable_device
from .progress import progress_bar
from .report_page import render_page
from .run_folders import (RunFolder, context_length, firing_counts, held_out_documents, read_run_folder,
                          trained_tokens)
from .steer import (SCALE_MULTIPLE, LayerMeans, Sampling, TokenText, coefficients, expert_directions, frequencies,
                    layer_width, parse_expert_ids, parse_scale, prompt_token_ids, promoted_tokens,
                    steered_generations)
from .top_contexts import TopContexts

REPORT_FILE = "index.html"
DEFAULT_PROMPTS = ("I think that", "The")


# ---- reading the layer ------------------------------------------------------------------------

@torch.no_grad()
def scan(model: nn.Module, layer_index: int, layer: nn.Module, contexts: Tensor, top: TopContexts,
         batch: int = 8, progress=None) -> LayerMeans:
    """Stream the held-out contexts through the model up to the layer's MLP (the forward pass stops there) and
    the layer: top-n contexts, firing counts and coefficient sums into `top`; returns the LayerMeans."""
    means = LayerMeans()
    device = next(model.parameters()).device
    with Harvester(model, layer_index) as harvester:
        for i in range(0, contexts.shape[0], batch):
            ids = contexts[i:i + batch]
            x, _ = harvester.harvest(ids.to(device))
            values, indices, z = coefficients(layer, x)
            top.update(ids, values, indices)
            means.add(values, z)
            if progress is not None:
                progress.update(ids.numel())
    return means


def promoted_and_suppressed(model: nn.Module, layer: nn.Module, z_mean: Optional[Tensor], count: int,
                            chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """([N, count], [N, count]) the tokens every expert promotes and suppresses most, in chunks of experts."""
    n = layer_width(layer)
    up, down = [], []
    for start in range(0, n, chunk):
        directions = expert_directions(layer, range(start, min(n, start + chunk)), z_mean)
        up.append(promoted_tokens(model, directions, count))
        down.append(promoted_tokens(model, directions, count, lowest=True))
    return torch.cat(up), torch.cat(down)


# ---- the page's data --------------------------------------------------------------------------

def _round(x: float) -> float:
    return float(f"{x:.4g}") if math.isfinite(x) else None


class Vocabulary:
    """The texts of the tokens the page shows, each once: index(token id) -> its place in `texts`."""

    def __init__(self, text: TokenText):
        self.text, self.places, self.texts = text, {}, []

    def index(self, token: int) -> int:
        token = int(token)
        if token not in self.places:
            self.places[token] = len(self.texts)
            self.texts.append(self.text(token))
        return self.places[token]


def expert_entries(top: TopContexts, frequency: Optional[Tensor], up: Tensor, down: Tensor, steered: dict,
                   vocabulary: Vocabulary) -> list:
    """One entry per expert: id, freq (training, or held-out), held_freq, mean coefficient when firing,
    promoted and suppressed tokens, contexts and (when generated) steered generations."""
    held = top.fired.double() / max(top.seen, 1)
    mean = top.coef_sum / top.fired.clamp_min(1).double()
    entries = []
    for n in range(top.n):
        contexts = [{"value": _round(value), "tokens": [vocabulary.index(t) for t in tokens],
                     "coefs": [_round(c) for c in coefs], "at": at} for value, tokens, coefs, at in top.contexts(n)]
        entries.append({"id": n, "freq": _round(float((frequency if frequency is not None else held)[n])),
                        "held_freq": _round(float(held[n])), "mean": _round(float(mean[n])) if top.fired[n] else None,
                        "promoted": [vocabulary.index(t) for t in up[n].tolist()],
                        "suppressed": [vocabulary.index(t) for t in down[n].tolist()],
                        "contexts": contexts, "steered": steered.get(n)})
    return entries


def histogram_svg(frequency: Tensor, bins: int = 30, width: int = 560, height: int = 190) -> str:
    """An inline SVG histogram of log10(frequency) over the experts that fired (the dead ones are listed apart)."""
    live = frequency[frequency > 0].double().log10()
    if live.numel() == 0:
        return '<p class="muted">no expert fired</p>'
    lo, hi = math.floor(float(live.min())), math.ceil(float(live.max()))
    hi = hi if hi > lo else lo + 1
    counts = torch.histc(live, bins=bins, min=lo, max=hi).tolist()
    left, bottom, plot_w, plot_h = 40, 28, width - 50, height - 40
    peak = max(counts) or 1
    bar_w = plot_w / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="histogram of log10 firing frequency">']
    for i, c in enumerate(counts):
        h = plot_h * c / peak
        parts.append(f'<rect x="{left + i * bar_w:.1f}" y="{height - bottom - h:.1f}" width="{bar_w - 1:.1f}" '
                     f'height="{h:.1f}" fill="#4c78a8"><title>{int(c)} experts</title></rect>')
    for tick in range(lo, hi + 1):
        x = left + plot_w * (tick - lo) / (hi - lo)
        parts.append(f'<line x1="{x:.1f}" y1="{height - bottom}" x2="{x:.1f}" y2="{height - bottom + 4}" '
                     f'stroke="#333"/><text x="{x:.1f}" y="{height - bottom + 16}" font-size="11" '
                     f'text-anchor="middle">1e{tick}</text>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{left + plot_w}" y2="{height - bottom}" '
                 f'stroke="#333"/><text x="4" y="14" font-size="11">{int(peak)}</text>'
                 f'<text x="{left + plot_w}" y="{height - 2}" font-size="11" text-anchor="end">firing frequency'
                 f'</text></svg>')
    return "".join(parts)


# ---- the command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mxd_fast.inspect", description=(
        "Write a self-contained HTML report of a trained layer (MxD or TopK transcoder): firing frequencies, dead "
        "experts, and per expert its top activating contexts, promoted tokens and steered generations "
        "(docs/inspect.md)."))
    p.add_argument("run", metavar="RUN_FOLDER", help="run folder (python -m mxd_fast.train)")
    p.add_argument("--out", default=None, help="output folder; the report is OUT/index.html (default: "
                   "RUN_FOLDER/report/)")
    p.add_argument("--text", nargs="+", default=None, help="held-out text files or folders (default: the run's "
                   "held-out documents)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens read (default: 16384)")
    p.add_argument("--contexts", type=int, default=5, help="top activating contexts kept per expert (default: 5)")
    p.add_argument("--before", type=int, default=12, help="tokens shown before the activating token (default: 12)")
    p.add_argument("--after", type=int, default=4, help="tokens shown after it (default: 4)")
    p.add_argument("--top-tokens", type=int, default=8, help="promoted and suppressed tokens per expert (default: 8)")
    p.add_argument("--steer-top", type=int, default=8, help="steered generations for the STEER_TOP most frequently "
                   "firing experts; 0: none (default: 8)")
    p.add_argument("--experts", default="", help="comma-separated expert ids also given steered generations")
    p.add_argument("--scale", default="auto", help=f"steering constant; auto: {SCALE_MULTIPLE:g} x the layer's mean "
                   "largest coefficient per held-out token (default: auto)")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="prompts of the steered generations "
                   "(default: " + ", ".join(repr(t) for t in DEFAULT_PROMPTS) + ")")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per steered generation (default: 16)")
    p.add_argument("--batch", type=int, default=8, help="held-out contexts per forward pass (default: 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    return p


def resolve(args) -> dict:
    """The command line checked by name before any model is loaded."""
    for option in ("eval_tokens", "contexts", "top_tokens", "tokens", "batch"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    for option in ("before", "after", "steer_top"):
        if getattr(args, option) < 0:
            raise ValueError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    if any(not p.strip() for p in args.prompts):
        raise ValueError(f"--prompts: a prompt is blank: {args.prompts!r}")
    run = read_run_folder(args.run)
    experts = parse_expert_ids(args.experts)
    bad = [n for n in experts if n >= run.size]
    if bad:
        raise ValueError(f"--experts {','.join(map(str, bad))}: out of range for RUN_FOLDER {run.folder}, whose "
                         f"layer has {run.size} experts (0 .. {run.size - 1})")
    return {"run": run, "experts": experts, "scale": parse_scale(args.scale),
            "device": usable_device(args.device, "--device"),
            "out": Path(args.out) if args.out is not None else run.folder / "report"}


def steering_choice(frequency: Tensor, steer_top: int, chosen: Sequence[int]) -> list:
    """The steer_top most frequently firing experts (ties: the lower id; only experts that fired) and the
    chosen ones."""
    order = sorted(range(frequency.shape[0]), key=lambda n: (-float(frequency[n]), n))
    picked = [n for n in order[:steer_top] if frequency[n] > 0]
    return picked + [n for n in chosen if n not in picked]


def steered_texts(model, tokenizer, run: RunFolder, layer, experts, scale: float, args) -> tuple[dict, list]:
    """({expert: [generation per prompt]}, [(prompt, unsteered generation)])."""
    if not experts:
        return {}, []
    prompts = prompt_token_ids(tokenizer, args.prompts)
    bar = progress_bar(len(experts), True, unit="expert", desc="steering")
    try:
        runs = steered_generations(model, tokenizer, layer, run.layer_index, experts, scale, prompts,
                                   Sampling(args.tokens), bar)
    finally:
        if bar is not None:
            bar.close()
    decode = (lambda ids: [tokenizer.decode(row) for row in ids.tolist()])
    return ({n: decode(runs[n]) for n in experts}, list(zip(args.prompts, decode(runs[None]))))


def read_held_out(model, tokenizer, plan: dict, layer, args) -> tuple[TopContexts, LayerMeans, str]:
    """The scan of the held-out text: (top contexts, layer means, description of the text)."""
    run = plan["run"]
    docs, source = held_out_documents(run, args.text, log=lambda m: print(m, file=sys.stderr))
    context = context_length(run)
    contexts = held_out_contexts(docs, tokenizer, context, max(1, -(-args.eval_tokens // context)))
    if contexts.shape[0] == 0:
        raise ValueError(f"the held-out text is shorter than one context of {context} tokens: pass --text FILES")
    top = TopContexts(layer_width(layer), args.contexts, args.before, args.after)
    bar = progress_bar(contexts.numel(), True, unit="token", desc="reading held-out text", unit_scale=True)
    try:
        means = scan(model, run.layer_index, layer, contexts, top, args.batch, bar)
    finally:
        if bar is not None:
            bar.close()
    return top, means, f"{source}: {contexts.shape[0]} contexts of {context} tokens"


def build_report(model, tokenizer, plan: dict, layer, args) -> str:
    """The page of the run's layer."""
    run = plan["run"]
    top, means, source = read_held_out(model, tokenizer, plan, layer, args)
    counts = firing_counts(run)
    frequency = frequencies(run, counts, layer.k)
    held = top.fired.double() / max(top.seen, 1)
    ranking = frequency if frequency is not None else held
    scale = plan["scale"] if plan["scale"] is not None else SCALE_MULTIPLE * means.typical_coefficient
    steered, baseline = steered_texts(model, tokenizer, run, layer, steering_choice(ranking, args.steer_top,
                                                                                  plan["experts"]), scale, args)
    up, down = promoted_and_suppressed(model, layer, means.z_mean, args.top_tokens)
    vocabulary = Vocabulary(TokenText(tokenizer))
    dead = [n for n in range(top.n) if (counts[n] == 0 if counts is not None else top.fired[n] == 0)]
    frequency_source = (f"training, {trained_tokens(run) or 'unknown'} tokens" if counts is not None
                        else "held-out text")
    data = {"arch": run.arch, "size": run.size, "frequency_source": frequency_source,
            "experts": expert_entries(top, frequency, up, down, steered, vocabulary),
            "by_frequency": [n for n in sorted(range(top.n), key=lambda n: (-float(ranking[n]), n))[:200]
                             if ranking[n] > 0],
            "steering": {"scale": scale, "prompts": list(args.prompts)}}
    data["tokens"] = vocabulary.texts
    title = f"{run.arch} layer: {run.folder.resolve().name}"
    subtitle = (f"{run.size} {'experts' if run.arch == 'mxd' else 'latents'}, k = {layer.k}, replacing the MLP of "
                f"block {run.layer_index} of {run.model or 'the embedded SmolLM2-135M-Instruct'}; held-out text: "
                f"{source}; firing frequencies from {frequency_source}")
    return render_page(title, subtitle, data, histogram_svg(ranking), dead, baseline)


def run(argv: Optional[Sequence[str]] = None) -> Path:
    """The command line: writes OUT/index.html and returns its path."""
    args = build_parser().parse_args(argv)
    plan = resolve(args)
    model, tokenizer = load_model(plan["run"].model, device=plan["device"])
    layer = load_layer(plan["run"].folder, device=plan["device"]).eval()
    width = getattr(model.config, "hidden_size", None)
    if width is not None and layer.d_in != width:
        raise ValueError(f"RUN_FOLDER {plan['run'].folder}: the layer takes inputs of width {layer.d_in}, the "
                         f"model's blocks are {width} wide")
    page = build_report(model, tokenizer, plan, layer, args)
    plan["out"].mkdir(parents=True, exist_ok=True)
    path = plan["out"] / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    print(f"written: {path}")
    return path
