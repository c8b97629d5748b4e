"""The top activating contexts of every expert (or latent), kept while held-out text streams past: a top-n per
expert, merged batch by batch, in tensors of size [experts, n] and [experts, n, window]; never a dense
[tokens, experts] tensor."""
from __future__ import annotations

import torch
from torch import Tensor


class TopContexts:
    """For each of `n_experts` experts: its `keep` largest coefficients over the tokens seen, each with the
    window of tokens around it (`before` tokens, the token, `after` tokens, within its context; -1 past the
    context's ends) and the expert's coefficient at each of them; and over all tokens, how many times it fired
    (coefficient > 0) and the sum of those coefficients."""

    def __init__(self, n_experts: int, keep: int = 5, before: int = 12, after: int = 4, chunk: int = 2048):
        self.n, self.keep, self.before, self.after, self.chunk = n_experts, keep, before, after, chunk
        width = before + 1 + after
        self.values = torch.full((n_experts, keep), -torch.inf)
        self.tokens = torch.full((n_experts, keep, width), -1, dtype=torch.int32)
        self.coefs = torch.zeros(n_experts, keep, width)
        self.fired = torch.zeros(n_experts, dtype=torch.int64)
        self.coef_sum = torch.zeros(n_experts, dtype=torch.float64)
        self.seen = 0

    def update(self, token_ids: Tensor, values: Tensor, indices: Tensor) -> None:
        """One batch: token_ids [B, T] and the layer's coefficients values, indices [B * T, K] at those tokens
        (row b * T + t for token t of context b)."""
        token_ids = token_ids.cpu()
        values, indices = values.detach().float().cpu(), indices.detach().long().cpu()
        active = values > 0
        self.fired += torch.bincount(indices[active], minlength=self.n)
        self.coef_sum.index_add_(0, indices[active], values[active].double())
        self.seen += values.shape[0]
        cand_values, cand_rows = self._batch_top(values, indices, active)
        merged = torch.cat([self.values, cand_values], dim=1)
        top = merged.topk(self.keep, dim=1)
        new = (top.indices >= self.keep) & (top.values > -torch.inf)   # slots filled from this batch
        old = top.indices.clamp(max=self.keep - 1)
        tokens = self.tokens.gather(1, old[..., None].expand(-1, -1, self.tokens.shape[2])).clone()
        coefs = self.coefs.gather(1, old[..., None].expand(-1, -1, self.coefs.shape[2])).clone()
        experts, slots = new.nonzero(as_tuple=True)
        rows = cand_rows[experts, top.indices[experts, slots] - self.keep]
        win_tokens, win_coefs = self._windows(token_ids, values, indices, experts, rows)
        tokens[experts, slots], coefs[experts, slots] = win_tokens, win_coefs
        self.values, self.tokens, self.coefs = top.values, tokens, coefs

    def _batch_top(self, values: Tensor, indices: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """([n, keep] the batch's largest coefficients of each expert (-inf where fewer fired), [n, keep] the
        rows they are at)."""
        row_of = torch.arange(values.shape[0]).repeat_interleave(values.shape[1]).view_as(values)
        v, e, r = values[active], indices[active], row_of[active]
        order = v.argsort(descending=True, stable=True)
        order = order[e[order].argsort(stable=True)]         # grouped by expert, largest first in each group
        v, e, r = v[order], e[order], r[order]
        starts = torch.zeros(self.n + 1, dtype=torch.long)
        starts[1:] = torch.bincount(e, minlength=self.n).cumsum(0)
        rank = torch.arange(e.shape[0]) - starts[e]
        kept = rank < self.keep
        cand_values = torch.full((self.n, self.keep), -torch.inf)
        cand_rows = torch.zeros(self.n, self.keep, dtype=torch.long)
        cand_values[e[kept], rank[kept]] = v[kept]
        cand_rows[e[kept], rank[kept]] = r[kept]
        return cand_values, cand_rows

    def _windows(self, token_ids: Tensor, values: Tensor, indices: Tensor, experts: Tensor, rows: Tensor
                 ) -> tuple[Tensor, Tensor]:
        """The windows around `rows` (token rows of the batch): their token ids [M, W] (-1 outside the
        context) and the coefficient of expert experts[m] at each [M, W]; in chunks of rows."""
        length = token_ids.shape[1]
        offsets = torch.arange(-self.before, self.after + 1)
        out_tokens, out_coefs = [], []
        for start in range(0, rows.shape[0], self.chunk):
            r, e = rows[start:start + self.chunk], experts[start:start + self.chunk]
            context, position = r // length, r % length
            where = position[:, None] + offsets[None, :]
            inside = (where >= 0) & (where < length)
            flat = context[:, None] * length + where.clamp(0, length - 1)
            toks = token_ids.reshape(-1)[flat].to(torch.int32).masked_fill(~inside, -1)
            match = indices[flat] == e[:, None, None]
            out_tokens.append(toks)
            out_coefs.append((values[flat] * match).sum(-1).masked_fill(~inside, 0.0))
        if not out_tokens:
            width = offsets.shape[0]
            return torch.zeros(0, width, dtype=torch.int32), torch.zeros(0, width)
        return torch.cat(out_tokens), torch.cat(out_coefs)

    def contexts(self, expert: int) -> list:
        """The expert's top contexts, largest first: [(value, token ids, coefficients, position of the top token
        among them), ...], the windows cut to the tokens inside their context."""
        out = []
        for j in range(self.keep):
            value = float(self.values[expert, j])
            if value == -float("inf"):
                break
            inside = self.tokens[expert, j] >= 0
            out.append((value, self.tokens[expert, j][inside].tolist(), self.coefs[expert, j][inside].tolist(),
                        int(inside[:self.before].sum())))
        return out
