"""Building blocks of sample inputs: seeded random tensors (drawn in float64 on the CPU, then cast, so a
sample holds the same values in every dtype up to rounding and on every device) and the layouts the
samples exercise (column-major, strided views)."""
from __future__ import annotations

import math

import torch


class Draw:
    """Random sample tensors of one dtype on one device, from a generator seeded with `seed`."""

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype = dtype
        self.device = torch.device(device)

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """t in the sample's dtype (floating t) on the sample's device."""
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def randn(self, *shape, scale: float = 1.0) -> torch.Tensor:
        return self.cast(torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale)

    def rand(self, *shape) -> torch.Tensor:
        return self.cast(torch.rand(*shape, generator=self.gen, dtype=torch.float64))

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        """int64 in [low, high), on the device."""
        return torch.randint(low, high, tuple(shape), generator=self.gen).to(self.device)

    def distinct(self, lead, n: int, k: int) -> torch.Tensor:
        """[*lead, k] int64: k distinct experts of n per row, in random order."""
        order = torch.rand(*lead, n, generator=self.gen).argsort(dim=-1)
        return order[..., :k].to(self.device)

    def selection(self, lead, n: int, k: int, unique: bool = True) -> torch.Tensor:
        """[*lead, k] int64 experts: distinct per row (unique, needs k <= n) or drawn with repeats."""
        return self.distinct(lead, n, k) if unique else self.randint(0, n, (*lead, k))


def rows(lead) -> int:
    return math.prod(lead)


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values with the first dimension contiguous (strides (1, rows) for a matrix)."""
    return t.T.contiguous().T


def every_other(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view with stride 2 in the last dimension."""
    return torch.stack((t, torch.zeros_like(t)), dim=-1).flatten(-2)[..., ::2]


def zero_every(t: torch.Tensor, step: int) -> torch.Tensor:
    """t with every step-th element (in memory order) set to 0; t itself for fewer than three elements."""
    if t.numel() > 2:
        t = t.clone()
        t.view(-1)[::step] = 0
    return t


# ---- benchmark inputs (drawn on the device, in the benchmark's dtype) ---------------------------

def bench_randn(shape, dtype: torch.dtype, device, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, device=device, generator=gen) * scale).to(dtype)


def random_selection(T: int, N: int, K: int, dtype, device, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """K distinct experts per token, uniform over [0, N), and positive values sorted descending."""
    idx = torch.randint(0, N - K + 1, (T, K), device=device, generator=gen).sort(dim=1).values
    idx += torch.arange(K, device=device)
    # shuffle within the row so the expert order is not sorted
    perm = torch.rand(T, K, device=device, generator=gen).argsort(dim=1)
    idx = idx.gather(1, perm)
    values = torch.rand(T, K, device=device, generator=gen).add_(0.05).sort(dim=1, descending=True).values
    return values.to(dtype), idx
