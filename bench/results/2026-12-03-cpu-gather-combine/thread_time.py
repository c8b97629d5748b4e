"""The gather_combine forward + backward in CPU time of one thread: the torch backend as of commit BEFORE
(its mxd_fast/_torch/sparse.py, read from git), the working tree's, and F.embedding_bag with its
gradients, in turns call by call on the same inputs.

    python bench/results/2026-12-03-cpu-gather-combine/thread_time.py c4567d2 15

torch.set_num_threads(1) and time.thread_time(): the time the calling thread ran, not the time it waited
for a core, so that the other jobs of a shared machine change the numbers less (they still share the
caches and the memory bus). Shapes: the CPU suite's (gpt2 at 512 tokens, the K and N sweeps at 256
tokens), gpt2 at 2048 tokens and d = 512, N = 16384, K = 32 at 2048 tokens.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

import mxd_fast
from mxd_fast.ops import _table

SHAPES = {"gpt2:T=512": (512, 32, 21490, 768),
          **{f"gpt2:T=256:K={k}": (256, k, 21490, 768) for k in (16, 32, 64, 128, 256)},
          **{f"gpt2:T=256:N={n}": (256, 32, n, 768) for n in (4096, 8192, 16384, 32768, 65536)},
          "gpt2:T=2048": (2048, 32, 21490, 768), "T=2048,d=512,N=16384": (2048, 32, 16384, 512)}


def backend_at(commit: str) -> _table.Entry:
    """The torch backend's gather_combine with sparse.py as of `commit` (the backward as it was then)."""
    old = types.ModuleType("sparse_at_" + commit)
    exec(subprocess.check_output(["git", "show", f"{commit}:mxd_fast/_torch/sparse.py"]).decode(), old.__dict__)

    def forward(weight, values, indices):
        values, indices, _ = old.in_range(values, indices, weight.shape[0])
        return old.gather_combine(weight, values, indices)

    def backward(grad_y, weight, values, indices, need_weight, need_values, deterministic):
        values, indices, valid = old.in_range(values, indices, weight.shape[0])
        dweight = old.scatter_rows(indices, values, grad_y, weight.shape[0], deterministic) if need_weight else None
        dvalues = old.gathered_dot(weight, indices, grad_y).where(valid, 0) if need_values else None
        return dweight, dvalues

    return _table.Entry(_table.TorchFunction(forward), _table.TorchFunction(backward))


def op_with(entry: _table.Entry):
    def call(weight, values, indices, grad_y):
        saved = _table.TABLE["gather_combine"]["torch"]
        _table.TABLE["gather_combine"]["torch"] = entry
        try:
            with mxd_fast.use_backend("torch"):
                return torch.autograd.grad(mxd_fast.gather_combine(weight, values, indices), [weight, values], grad_y)
        finally:
            _table.TABLE["gather_combine"]["torch"] = saved
    return call


def embedding_bag(weight, values, indices, grad_y):
    y = F.embedding_bag(indices, weight, per_sample_weights=values, mode="sum")
    return torch.autograd.grad(y, [weight, values], grad_y)


def inputs(T, K, N, d, seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(N, d, generator=g) / d ** 0.5).requires_grad_()
    indices = torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(T)])
    values = torch.rand(T, K, generator=g).requires_grad_()
    return weight, values, indices, torch.randn(T, d, generator=g)


def main(before: str, reps: int) -> None:
    torch.set_num_threads(1)
    fns = {"before": op_with(backend_at(before)), "after": op_with(_table.TABLE["gather_combine"]["torch"]),
           "embedding_bag": embedding_bag}
    print(f"one thread, time.thread_time, {reps} calls each in turns; before = {before}; ms: min / median")
    print(f"{'shape':24s} {'before':>17s} {'after':>17s} {'embedding_bag':>17s}  after/embedding_bag (median)")
    for name, dims in SHAPES.items():
        data = [inputs(*dims, seed) for seed in (0, 1)]
        for fn in fns.values():
            fn(*data[0])
        times = {k: [] for k in fns}
        for r in range(reps):
            for k, fn in fns.items():
                t0 = time.thread_time()
                out = fn(*data[r % 2])
                times[k].append(time.thread_time() - t0)
                del out
        cells = "".join(f" {min(t) * 1e3:8.2f} / {statistics.median(t) * 1e3:6.2f}" for t in times.values())
        ratio = statistics.median(times["after"]) / statistics.median(times["embedding_bag"])
        print(f"{name:24s}{cells}  {ratio:.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15)
