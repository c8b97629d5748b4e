"""Generating text from a few prompts (greedy or seeded sampling, a batch at a time with a KV cache) and scoring
the generations with a model: the mean next-token loss of the generated tokens and their mean-pooled final
hidden state. Used by python -m mxd_fast.steer and python -m mxd_fast.inspect."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prompt_token_ids(tokenizer, prompts: Sequence[str], option: str = "--prompts") -> list:
    """Per prompt: the end-of-text token (the document separator the layers were trained with, so that a
    prompt starts like a document) and the prompt's tokens (no other special token)."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    out = []
    for prompt in prompts:
        ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError(f"{option}: the prompt {prompt!r} has no token")
        out.append(([int(separator)] if separator is not None else []) + ids)
    return out


def special_token_ids(tokenizer) -> list:
    """The tokenizer's special tokens (end of text, ...): never generated, so that every generation is text
    of the length asked for."""
    return sorted({int(i) for i in getattr(tokenizer, "all_special_ids", []) or []})


def _left_padded(prompts: Sequence[list], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, position_ids) [P, L], the prompts left-padded; each prompt's positions
    count from 0 at its first token, so padding changes nothing it computes."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for row, tokens in enumerate(prompts):
        ids[row, length - len(tokens):] = torch.tensor(tokens)
        mask[row, length - len(tokens):] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def _next_tokens(logits: Tensor, suppress: Sequence[int], temperature: float, generator) -> Tensor:
    """The next token of each row: the most likely (temperature 0) or drawn from softmax(logits / temperature)
    with `generator` (on the CPU, so that a seed gives the same draws on every device)."""
    logits = logits.float()
    if suppress:
        logits[:, list(suppress)] = -math.inf
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def generate(model: nn.Module, prompts: Sequence[list], new_tokens: int, temperature: float = 0.0, seed: int = 0,
             suppress: Sequence[int] = (), pad_id: int = 0) -> Tensor:
    """[P, new_tokens] token ids continuing each prompt (token id lists), all prompts in one batch with a KV
    cache. temperature 0: greedy; else sampling seeded by `seed` (the same draws for the same seed)."""
    device = next(model.parameters()).device
    ids, mask, positions = _left_padded(prompts, pad_id, device)
    generator = torch.Generator().manual_seed(int(seed))
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    generated = []
    for step in range(new_tokens):
        token = _next_tokens(out.logits[:, -1], suppress, temperature, generator)
        generated.append(token)
        if step + 1 == new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(generated, dim=1).cpu()


@torch.no_grad()
def score_generations(model: nn.Module, prompts: Sequence[list], generated: Tensor, pad_id: int = 0
                      ) -> tuple[Tensor, Tensor]:
    """(loss [P], pooled [P, d]) from one forward pass of `model` over each prompt followed by its generation
    (right-padded): loss = the mean next-token cross-entropy of the generated tokens (nats), pooled = the
    mean over the generated tokens of the model's final hidden state (its last hidden_states entry, what the
    unembedding reads)."""
    device = next(model.parameters()).device
    n_new = generated.shape[1]
    rows = [list(p) + generated[i].tolist() for i, p in enumerate(prompts)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True, use_cache=False)
    losses, pooled = [], []
    for i, prompt in enumerate(prompts):
        start = len(prompt)                      # the first generated token's position
        logits = out.logits[i, start - 1:start - 1 + n_new].float()
        losses.append(F.cross_entropy(logits, generated[i].to(logits.device)))
        pooled.append(out.hidden_states[-1][i, start:start + n_new].float().mean(0))
    return torch.stack(losses).cpu(), torch.stack(pooled).cpu()


def mean_pairwise_cosine(vectors: Tensor, center: Tensor | None = None) -> float:
    """The mean cosine similarity over the pairs of distinct rows of `vectors` [n, d] (n >= 2), each minus
    `center` when given. Identical rows give 1."""
    if vectors.shape[0] < 2:
        raise ValueError(f"coherence needs at least 2 generations, got {vectors.shape[0]}")
    v = vectors.double() - (center.double() if center is not None else 0.0)
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = unit @ unit.T
    n = v.shape[0]
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))
