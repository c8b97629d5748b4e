"""Problem sizes of the benchmark suite.

A Shape is one MxD layer setting: model width d (= I = O), dense hidden width H, number of experts N,
active experts K, and tokens T per batch. The four paper settings use the paper's N; every other
shape sizes N with mxd_fast.mxd_experts_for_budget (same parameters as a TopK transcoder of width
32*d) unless N is given.

Shape specs on the command line: a name (`gpt2`), a name with overrides (`gpt2:T=2048,K=64`), a
sweep (`sweep-k`, `sweep-n`, `sweep-t`, optionally `sweep-k@gpt2:T=512` to choose the base shape),
or `paper` (the four paper settings).
"""
from __future__ import annotations

import dataclasses
import re

import mxd_fast

TRANSCODER_WIDTH_FACTOR = 32   # the transcoder MxD is compared with has width 32*d
MLP_FACTOR = 4                 # the dense MLP is d -> 4d -> d


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d: int
    H: int
    N: int
    K: int
    T: int
    sweep: str = ""            # "K", "N" or "T" when the shape belongs to a sweep (plots use it)

    def dims(self) -> dict:
        return {"T": self.T, "d": self.d, "H": self.H, "N": self.N, "K": self.K}

    def label(self) -> str:
        return f"{self.name}[T={self.T},d={self.d},H={self.H},N={self.N},K={self.K}]"

    @property
    def transcoder_width(self) -> int:
        return TRANSCODER_WIDTH_FACTOR * self.d


def budget_experts(d: int, H: int) -> int:
    return mxd_fast.mxd_experts_for_budget(d, H, d, TRANSCODER_WIDTH_FACTOR * d)


def make_shape(name: str, d: int, H: int, T: int, K: int = 32, N: int | None = None, sweep: str = "") -> Shape:
    return Shape(name=name, d=d, H=H, N=budget_experts(d, H) if N is None else N, K=K, T=T, sweep=sweep)


# The paper's four settings (4096 tokens a batch, K = 32 by default).
PAPER = {
    "gpt2": make_shape("gpt2", 768, 3072, 4096, N=21490),
    "pythia-410m": make_shape("pythia-410m", 1024, 4096, 4096, N=28658),
    "pythia-1.4b": make_shape("pythia-1.4b", 2048, 8192, 4096, N=57330),
    # The paper's N = 90087 rounded up to a multiple of 8: with an odd N the dense baselines' bf16 [T, N] rows
    # are not 16-byte aligned and cuBLAS takes a path about 4x slower (measured on an H200).
    "llama-3.2-3b": make_shape("llama-3.2-3b", 3072, 8192, 4096, N=90088),
}

# Small settings: CPU runs and smoke tests. Odd sizes on purpose (no multiple of any block).
SMALL = {
    "small": make_shape("small", 256, 1024, 512),                 # N = budget (about 28 d)
    "tiny": Shape("tiny", d=24, H=40, N=37, K=5, T=19),
}

NAMED = {**PAPER, **SMALL}

SWEEP_K = (16, 32, 64, 128, 256)
SWEEP_N = (4096, 8192, 16384, 32768, 65536, 131072)
SWEEP_T = (512, 1024, 2048, 4096, 8192, 16384)

_KEYS = {"T": "T", "K": "K", "N": "N", "H": "H", "D": "d"}


def parse_shape(spec: str, sweep: str = "") -> Shape:
    """`name` or `name:KEY=value,...` (keys T, K, N, H, d). Changing d or H re-sizes N by budget
    unless N is given too."""
    name, _, rest = spec.partition(":")
    if name not in NAMED:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(NAMED)}")
    base = NAMED[name]
    fields = base.dims()
    changed = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key.upper() not in _KEYS or not re.fullmatch(r"\d+", value.strip()):
            raise ValueError(f"bad shape override {item!r} in {spec!r}: use KEY=int with KEY in T, K, N, H, d")
        changed[_KEYS[key.upper()]] = int(value)
    fields.update(changed)
    empty = [f"{k}={fields[k]}" for k in ("T", "d", "H") if fields[k] < 1]
    if empty:
        raise ValueError(f"shape {spec!r}: T, d and H must be >= 1, got {', '.join(empty)}")
    if ("d" in changed or "H" in changed) and "N" not in changed:
        fields["N"] = budget_experts(fields["d"], fields["H"])
    label = name if not changed else f"{name}:" + ",".join(f"{k}={v}" for k, v in changed.items())
    if not 1 <= fields["K"] <= fields["N"]:
        raise ValueError(f"shape {spec!r}: K must satisfy 1 <= K <= N, got K={fields['K']}, N={fields['N']}")
    return Shape(name=label, sweep=sweep, **fields)


def sweep(kind: str, base: Shape) -> list[Shape]:
    kind = kind.upper()
    base_name = base.name

    def variant(**kw):
        fields = {**base.dims(), **kw}
        label = base_name + ":" + ",".join(f"{k}={v}" for k, v in kw.items())
        return Shape(name=label, sweep=kind, **fields)

    if kind == "K":
        shapes = [variant(K=k) for k in SWEEP_K if k <= base.N]
    elif kind == "N":
        shapes = [variant(N=n) for n in SWEEP_N if n >= base.K]
    elif kind == "T":
        shapes = [variant(T=t) for t in SWEEP_T]
    else:
        raise ValueError(f"unknown sweep {kind!r}: use K, N or T")
    if not shapes:
        values = {"K": SWEEP_K, "N": SWEEP_N}[kind]
        raise ValueError(f"sweep over {kind} of {base.label()}: none of {kind} = {', '.join(map(str, values))} "
                         f"satisfies K <= N")
    return shapes


def cpu_scaled(kind: str) -> list[Shape]:
    """Sweeps small enough for a few seconds each on two CPU cores."""
    base = parse_shape("gpt2:T=256")
    shapes = sweep(kind, base)
    if kind.upper() == "N":
        shapes = [s for s in shapes if s.N <= 65536]
    if kind.upper() == "T":
        shapes = [s for s in sweep("T", parse_shape("gpt2:T=512")) if s.T <= 2048]
    return shapes


def split_specs(text: str) -> list[str]:
    """A comma-separated list of shape specs, where a spec's own overrides also use commas:
    "pythia-1.4b:T=8192,K=128,sweep-k" -> ["pythia-1.4b:T=8192,K=128", "sweep-k"]."""
    specs: list[str] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if specs and ":" in specs[-1] and re.fullmatch(r"[A-Za-z]+=\d+", item):
            specs[-1] += "," + item
        else:
            specs.append(item)
    return specs


def resolve(specs: list[str], device_type: str) -> list[Shape]:
    """Expand shape specs into a list of shapes (duplicates removed, also one named twice: order kept)."""
    out: list[Shape] = []
    for spec in specs:
        if spec == "paper":
            out += list(PAPER.values())
        elif spec.startswith("sweep-"):
            kind, _, base_spec = spec[len("sweep-"):].partition("@")
            if base_spec:
                out += sweep(kind, parse_shape(base_spec))
            elif device_type == "cuda":
                out += sweep(kind, PAPER["pythia-1.4b"])
            else:
                out += cpu_scaled(kind)
        else:
            out.append(parse_shape(spec))
    seen, unique = set(), []
    for s in out:
        key = (s.T, s.d, s.H, s.N, s.K, s.sweep)
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique
