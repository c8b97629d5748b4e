"""The exact top-k gate on fp32 CPU tensors, screened by one bf16 GEMM.

topk_gate's values are the k largest entries of relu(x @ weight.T + bias). The direct forward computes
every logit in fp32. Screening computes them in bf16 (about three times the fp32 rate on CPUs with bf16
dot-product instructions) and still returns the exact selection:

1. Screen: one bf16 GEMM gives, for each row b and expert n, an upper bound U_bn >= t_bn, the exact
   logit x_b . g_n + bias_n (derivation below).
2. Rescore: the k + m experts of a row with the largest bounds are its candidates; their logits are
   recomputed in fp32 (sampled dot products), relu'd, and the k largest taken.
3. Certify: the row is exact when the largest bound over its non-candidates is <= v_k, the k-th of the
   rescored values. v_k >= 0, so each non-candidate has relu(t) <= max(U, 0) <= v_k: at most a tie (at
   v_k = 0 every non-candidate must be certified <= 0). A rescored logit outside the screen's interval
   for it also fails the row. Failed rows, rows with a non-finite entry and rows whose fp32 sums could
   overflow are recomputed by the direct path; a non-finite weight or bias sends the whole batch there.

The bound. x~ = bf16(x), r_x = x - x~ (exact in fp32); likewise g~ and r_g for an expert row g. Since
x.g - x~.g~ = r_x.g + x~.r_g, Cauchy-Schwarz gives |x.g - x~.g~| <= ||r_x|| ||g|| + ||x~|| ||r_g||.
The GEMM runs over augmented rows of P columns (zero padded),
    [x~, a, c, d, 1, 1, 1] . [g~, G, R, H, bhi, blo, A],
whose coefficients are computed in fp64 (or as inflated fp32 sums of squares) and rounded up to normal
bf16 numbers, so that, with gamma = P u / (1 - P u), u = 2^-24 and s = sqrt(I) 2^-126,
    a G >= (1 + 2 gamma) (||r_x|| + s) ||g||,   c R >= (1 + 2 gamma) ||x~|| (||r_g|| + 2 s),
    d H >= (2 gamma ||x~|| + s) ||g~||,   bhi + blo >= bias + 3 gamma |bias|,   A = 4 (P + 2) 2^-126.
Products of bf16 numbers are exact in fp32; an fp32 sum of the P products in any order (blocked, FMA)
is within gamma sum_j |p_j| of the exact sum, plus 2^-126 for each product or partial sum flushed to
zero. bf16 dot-product instructions also read subnormal inputs as zero, which loses at most
s ||g~|| (x~'s) plus s ||x~|| (g~'s); s also covers a flush in the fp32 subtraction r = x - x~. As
sum_i |x~_i g~_i| <= ||x~|| ||g~||, the coefficient columns pay for the input rounding, the accumulation
error (theirs included), the subnormals and the flushes: the accumulated sum Z satisfies Z >= t. The
output L = bf16(Z) (round to nearest) has |L - Z| <= 2^-8 |Z|, so U = L + 2^-8 / (1 - 2^-8) |L| + 2^-125
>= t. Candidates are ranked by L: U increases with L, so this ranking minimises the largest bound
over the non-candidates for a given m.

The certificate trusts the bf16 GEMM to follow that model (fp32 accumulation, one rounding to nearest
of the output): bf16_screen_sound() checks it once per process on inputs where bf16 accumulation or
another output rounding would break the bound, and screening is never used where it fails.

Cost: one bf16 GEMM over P = I + 6 (padded) columns, four passes over the weight (its bf16 copy, the
residual, two sums of squares), a running top-(k + m + 1) per row in bf16 over wide tiles of experts
(grouped: see _tile_top), and (k + m) fp32 dot products per row; a row left uncertified is screened
again (its share of the GEMM) keeping k + 3m + 1.
"""
from __future__ import annotations

import math
import os
import threading
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from mxd_fast._utils import Counters

ENV_VAR = "MXD_FAST_EXACT_GATE"
MODES = ("auto", "direct", "screened")

# Experts per screening tile (at least); with _TILE_ELEMENTS it bounds the bf16 logits that exist at
# once. Wide tiles make the per-tile top-k cheaper per entry: at least _TILE_PER_KEEP entries per one kept.
_TILE_EXPERTS = 16384
_TILE_PER_KEEP = 64
_PREP_ROWS = 1024     # rows whose fp32 residuals are formed at once
_TILE_ELEMENTS = 1 << 22
_COEFFS = 6           # augmented columns: three bound terms, the bias in two parts, the flush term
_PAD = 8              # the GEMM's inner dimension is padded to a multiple of this
_MIN_SPEEDUP = 1.5    # auto screens only where the bf16 GEMM is at least this much faster than fp32
_MIN_ROWS = 256       # ... and batches of at least this many rows: the weight's preparation (four passes)
                      # is paid per call, the GEMM saved per row (an estimate, not yet timed on an idle CPU)
# ... and at least _MIN_EXPERTS_BASE + _MIN_EXPERTS_PER_CANDIDATE * (k + m) experts: each row rescores k + m
# of them by gathered dot products, far slower per FLOP than the GEMM they replace. Measured at 2048 rows,
# 1 thread (a loaded 2-core AMD EPYC): I = 576, k = 32: 0.85x at N = 3072, 1.40x at 4096, 2.1x at 6144;
# I = 768, k = 128: 1.09x at N = 4096, 1.69x at 8192.
_MIN_EXPERTS_BASE = 2048
_MIN_EXPERTS_PER_CANDIDATE = 24

_U32 = 2.0 ** -24
_U_BF16 = 2.0 ** -8
_TINY = 2.0 ** -126   # smallest normal fp32 (and bf16) number
_OVERFLOW = 2.0 ** 126
Direct = Callable[[Tensor, Tensor, Optional[Tensor], int], "tuple[Tensor, Tensor]"]


# ---- switch ------------------------------------------------------------------------------

def exact_gate_mode() -> str:
    """MXD_FAST_EXACT_GATE: "auto" (default: screen where screening_supported()), "direct" (never
    screen) or "screened" (screen wherever the bf16 GEMM passes its self-check)."""
    raw = os.environ.get(ENV_VAR)
    value = "" if raw is None else raw.strip().lower()
    if not value:
        return "auto"
    if value not in MODES:
        raise ValueError(f"environment variable {ENV_VAR} must be one of {MODES}, got {raw!r}")
    return value


def margin(k: int, n_cols: int) -> int:
    """m: the candidates beyond k that each row rescores first (k + 3m for a row left uncertified).
    The experts a row needs grow with the bound's width relative to the spread of the logits (about
    0.1 sqrt(I / 768) standard deviations) and with the density of logits near the k-th (about as
    k^0.75). With this m, on random and structured synthetic gates (Gaussian, anisotropic inputs with
    outlier dimensions, clustered inputs with aligned gate rows, low-rank inputs, spread gate norms) at
    I = 768, N = 21490 and I = 2048, N = 57330, k = 32 and 128: 0-4% of the rows needed the second
    round and none the direct path. No trained gate was at hand to measure."""
    m = 2.0 * k ** 0.75 * math.sqrt(max(n_cols, 1) / 768)
    return max(16, -(-math.ceil(m) // 8) * 8)


def auto_min_experts(k: int, n_cols: int) -> int:
    """The fewest experts at which "auto" screens a top-k gate over n_cols inputs."""
    return _MIN_EXPERTS_BASE + _MIN_EXPERTS_PER_CANDIDATE * (k + margin(k, n_cols))


def screenable(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int) -> bool:
    """Whether screening applies to these inputs at all: fp32 on the CPU, and enough experts left
    over after the candidates for the screen to save work."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and x.shape[0] > 0 and x.shape[1] > 0 and weight.shape[0] > k + margin(k, x.shape[1]))


def topk_gate_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, direct: Direct):
    """The gate's forward on [B, I] x: screened where MXD_FAST_EXACT_GATE and the machine allow it and
    the inputs are screenable (under "auto", also at least _MIN_ROWS rows and auto_min_experts(k, I)
    experts), else direct(x, weight, bias, k)."""
    mode = exact_gate_mode()
    if mode == "direct" or not screenable(x, weight, bias, k):
        return direct(x, weight, bias, k)
    if mode == "screened" and not bf16_screen_sound():
        _warn_once("MXD_FAST_EXACT_GATE=screened: the bf16 GEMM here fails the screen's self-check; "
                   "the gate runs the direct path")
        return direct(x, weight, bias, k)
    if mode == "auto" and (x.shape[0] < _MIN_ROWS or weight.shape[0] < auto_min_experts(k, x.shape[1])
                           or not screening_supported()):
        return direct(x, weight, bias, k)
    return screened_topk_gate(x, weight, bias, k, direct)


_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---- statistics --------------------------------------------------------------------------

_STAT_KEYS = ("calls", "rows_screened", "rows_retried", "rows_fallback", "rows_inconsistent", "calls_direct")
_stats = Counters(_STAT_KEYS)


def screen_stats() -> dict:
    """Counts since the last reset: calls of screened_topk_gate that screened; rows screened; rows that
    needed the second round of rescoring (k + 3m candidates); rows recomputed by the direct path
    (uncertified, non-finite or at risk of overflow); rows whose rescored logits contradicted the
    screen (they fall back too; nonzero means a fault in the screen or the rescoring); and calls sent
    wholly to the direct path (inputs not screenable, non-finite weight or bias)."""
    return _stats.snapshot()


def reset_screen_stats() -> None:
    _stats.reset()


def _count(**deltas: int) -> None:
    _stats.add(**deltas)


# ---- bound columns -----------------------------------------------------------------------

def _gamma(n: int) -> float:
    return n * _U32 / (1 - n * _U32)


def _bf16_up(v: Tensor) -> Tensor:
    """The least bf16 number >= v (fp64) that is zero or normal: rounded up, subnormals moved up to
    2^-126 (positive) or 0 (negative). torch rounds fp64 to bf16 through fp32 (twice), hence the fix."""
    y = v.to(torch.bfloat16)
    y = torch.where(y.double() < v, torch.nextafter(y, y.new_full((), math.inf)), y)
    f = y.float()
    y = torch.where((f > 0) & (f < _TINY), y.new_full((), _TINY), y)
    return torch.where((f < 0) & (f > -_TINY), y.new_zeros(()), y)


def _augmented_rows(rows: Tensor, aug: Tensor, resid: Tensor) -> tuple[Tensor, Tensor]:
    """Fill aug's first I columns with bf16(rows) (its other columns are left as they are) and return
    upper bounds on the norms of rows and of their residuals rows - bf16(rows). A residual is exact in
    fp32 (an fp32 number minus its rounding to bf16); it is formed in chunks of rows in `resid`, a small
    buffer that stays in cache."""
    n_rows, n_cols = rows.shape
    aug[:, :n_cols] = rows
    norms, resid_norms = _row_norms(rows), torch.empty(n_rows, dtype=torch.float64)
    for r0 in range(0, n_rows, resid.shape[0]):
        chunk = resid[:min(resid.shape[0], n_rows - r0)]
        chunk.copy_(aug[r0:r0 + chunk.shape[0], :n_cols])
        torch.sub(rows[r0:r0 + chunk.shape[0]], chunk, out=chunk)
        resid_norms[r0:r0 + chunk.shape[0]] = _row_norms(chunk)
    return norms, resid_norms


def fp64_norm_bounds(rows: Tensor) -> Tensor:
    """Upper bounds on the row norms of [R, I] `rows`, summed in fp64 (inflated for the rounding of the
    fp64 sum of squares and its square root)."""
    inflate = 1 + (rows.shape[1] + 4) * 2.0 ** -52
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64) * inflate


def _row_norms(rows: Tensor) -> Tensor:
    """Upper bounds (fp64) on the row norms of an fp32 [R, I] tensor, cheaply: fp32 norms (a sum of
    squares) inflated for their rounding (gamma_I, the square root's) and for squares or sums flushed to
    zero (2^-126 each); rows whose fp32 sums could have overflowed or underflowed (norm < 2^-20) are
    summed in fp64 instead."""
    n_cols = rows.shape[1]
    fp32 = torch.linalg.vector_norm(rows, dim=1)
    redo = ~(fp32 >= 2.0 ** -20) | ~torch.isfinite(fp32)
    norms = fp32.double()
    norms = torch.sqrt(norms * norms * (1 + 2 * _gamma(n_cols + 1)) + 2 * (n_cols + 1) * _TINY)
    norms *= 1 + 2.0 ** -22
    if bool(redo.any()):
        norms[redo] = fp64_norm_bounds(rows[redo])
    return norms


def _row_side(x: Tensor, width: int):
    """Augmented bf16 rows of x [B, I], upper bounds on the norms ||x_b|| (fp64), and whether each row is
    finite in both formats. The flush slack s = sqrt(I) 2^-126 covers bf16 subnormals that the GEMM
    reads as zero (paired with ||g~||) and a flush in the fp32 residual (paired with ||g||)."""
    B, n_cols = x.shape
    gamma = _gamma(width)
    flush = math.sqrt(n_cols) * _TINY
    aug = torch.zeros(B, width, dtype=torch.bfloat16)
    norm, resid_norm = _augmented_rows(x, aug, torch.empty(min(B, _PREP_ROWS), n_cols))
    norm_low = _row_norms(aug[:, :n_cols].float())
    coeffs = [_bf16_up((resid_norm + flush) * (1 + 2 * gamma)), _bf16_up(norm_low * (1 + 2 * gamma)),
              _bf16_up(norm_low * (2 * gamma) + flush)]
    for j, column in enumerate(coeffs):
        aug[:, n_cols + j] = column
    aug[:, n_cols + 3:n_cols + _COEFFS] = 1
    finite = torch.isfinite(norm) & torch.isfinite(norm_low)
    for column in coeffs:
        finite &= torch.isfinite(column)
    return aug, norm, finite


def _expert_side(weight: Tensor, bias: Optional[Tensor], aug: Tensor, resid: Tensor):
    """Fill aug (bf16 [T, P], zero beyond the coefficient columns) with the augmented rows of a tile of
    experts [T, I] (resid: an fp32 buffer of rows for _augmented_rows) and return upper bounds on their
    norms ||g_n|| (fp64); None where a coefficient is not finite (a non-finite weight, or one past
    bf16's range).
    G >= ||g||, R >= ||r_g|| + 2 sqrt(I) 2^-126 (a flush in the residual; bf16 subnormals of g~ read as
    zero, paired with ||x~||), H = G + R >= ||g~||."""
    n_cols = weight.shape[1]
    gamma = _gamma(aug.shape[1])
    norm, resid_norm = _augmented_rows(weight, aug, resid)
    resid_norm += 2 * math.sqrt(n_cols) * _TINY
    b = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    b_eff = b + 3 * gamma * b.abs()
    hi = b_eff.to(torch.bfloat16)
    hi = torch.where(hi.float().abs() < _TINY, hi.new_zeros(()), hi)   # no subnormal: it would be read as 0
    lo = _bf16_up(b_eff - hi.double())
    flush = _bf16_up(torch.full_like(b, 4 * (aug.shape[1] + 2) * _TINY))
    coeffs = [_bf16_up(norm), _bf16_up(resid_norm), _bf16_up(norm + resid_norm), hi, lo, flush]
    for j, column in enumerate(coeffs):
        if not bool(torch.isfinite(column).all()):
            return None
        aug[:, n_cols + j] = column
    return norm


# ---- screen, rescore, certify ------------------------------------------------------------

def _screen_mm(rows: Tensor, experts: Tensor) -> Tensor:
    """The screen's GEMM: bf16 rows [B, P] x bf16 experts [T, P] -> bf16 [B, T]."""
    return torch.mm(rows, experts.T)


def _merge(state, v: Tensor, i: Tensor, keep: int):
    if state is None:
        return v, i
    v = torch.cat((state[0], v), dim=1)
    i = torch.cat((state[1], i), dim=1)
    v, pos = v.topk(min(keep, v.shape[1]), dim=1, sorted=False)
    return v, i.gather(1, pos)


def _group_size(n: int, keep: int) -> int:
    """Columns per group of _tile_top: the largest of 32, 16, 8 leaving at least 8 keep groups, else 1."""
    return next((g for g in (32, 16, 8) if n // g >= 8 * keep), 1)


def _tile_top(logits: Tensor, keep: int):
    """The `keep` largest entries of each row of logits [R, T] and their columns (unsorted). Grouped:
    the columns j, j + W, j + 2W, ... (W = T / G) form group j; the keep groups with the largest maxima
    hold the keep largest values (each group with a maximum above the keep-th value holds one of the
    keep - 1 larger values; ties at it may pick any tied entry), so one elementwise max over G slices, a
    top-k over the W maxima and one over keep * G gathered entries replace torch.topk over all T."""
    R, T = logits.shape
    G = _group_size(T, keep)
    if G == 1:
        return logits.topk(min(keep, T), dim=1, sorted=False)
    W = T // G
    groups = logits[:, :G * W].unflatten(1, (G, W))
    _, gi = groups.amax(1).topk(keep, dim=1, sorted=False)
    gathered = groups.gather(2, gi.unsqueeze(1).expand(-1, G, -1)).reshape(R, G * keep)
    v, pos = gathered.topk(keep, dim=1, sorted=False)
    i = torch.div(pos, keep, rounding_mode="floor") * W + gi.gather(1, pos % keep)
    if G * W < T:                                  # the last T - G W < G columns
        rest_v, rest_i = logits[:, G * W:].topk(min(keep, T - G * W), dim=1, sorted=False)
        v, i = _merge((v, i), rest_v, rest_i.add_(G * W), keep)
    return v, i


def _screen(x_aug: Tensor, x_norm: Tensor, rows_ok: Tensor, weight: Tensor, bias: Optional[Tensor],
            keep: int):
    """Per row, the `keep` largest screened values L (bf16, sorted descending) and their experts, plus
    the experts' bound columns [N, 6]; None when the weight cannot be screened (non-finite or past
    bf16's range). Clears rows_ok where an fp32 logit sum of the row could overflow."""
    B, width = x_aug.shape
    N, I = weight.shape
    tile_n = min(N, max(_TILE_EXPERTS, _TILE_PER_KEEP * keep))
    tile_b = max(1, _TILE_ELEMENTS // tile_n)
    expert_coeffs = torch.empty(N, _COEFFS, dtype=torch.bfloat16)
    states = [None] * len(range(0, B, tile_b))
    aug_buffer = torch.empty(tile_n, width, dtype=torch.bfloat16)
    aug_buffer[:, I + _COEFFS:] = 0
    resid_buffer = torch.empty(min(tile_n, _PREP_ROWS), I)
    for n0 in range(0, N, tile_n):
        b_tile = None if bias is None else bias[n0:n0 + tile_n]
        w_tile = weight[n0:n0 + tile_n]
        w_aug = aug_buffer[:w_tile.shape[0]]
        g_norm = _expert_side(w_tile, b_tile, w_aug, resid_buffer)
        if g_norm is None:
            return None
        expert_coeffs[n0:n0 + tile_n] = w_aug[:, I:I + _COEFFS]
        b_max = 0.0 if b_tile is None else float(b_tile.abs().max())
        rows_ok &= x_norm * float(g_norm.max()) + b_max <= _OVERFLOW
        for t, b0 in enumerate(range(0, B, tile_b)):
            logits = _screen_mm(x_aug[b0:b0 + tile_b], w_aug)
            v, i = _tile_top(logits, keep)
            states[t] = _merge(states[t], v, i.add_(n0), keep)
    top_v = torch.cat([s[0] for s in states])
    top_i = torch.cat([s[1] for s in states])
    top_v, order = top_v.sort(dim=1, descending=True)
    return top_v, top_i.gather(1, order), expert_coeffs


def _rescore(x: Tensor, weight: Tensor, bias: Optional[Tensor], candidates: Tensor) -> Tensor:
    """fp32 logits x_b . g_n + bias_n of each row's candidate experts n: [B, C] -> [B, C]. A sampled
    product with expert-major rows, so that each weight row is read once."""
    B, C = candidates.shape
    N = weight.shape[0]
    keys = (candidates * B + torch.arange(B).unsqueeze(1)).reshape(-1)
    keys, order = keys.sort()
    experts = torch.div(keys, B, rounding_mode="floor")
    crow = torch.zeros(N + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(experts, minlength=N).cumsum(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        mask = torch.sparse_csr_tensor(crow, keys - experts * B, torch.zeros(B * C), size=(N, B),
                                       check_invariants=False)
        dots = torch.sparse.sampled_addmm(mask, weight.contiguous(), x.T, beta=0.0).values()
    out = torch.empty(B * C, dtype=torch.float32)
    out[order] = dots
    out = out.reshape(B, C)
    return out if bias is None else out.add_(bias[candidates])


def _screen_interval(top_v: Tensor, cand: Tensor, x_aug: Tensor, expert_coeffs: Tensor,
                     bias: Optional[Tensor], n_cols: int):
    """(lower, upper) fp64 bounds on the exact logits of the candidates `cand` [R, C] from their
    screened values top_v [R, C] and the bound columns of their rows (x_aug [R, P]) and experts."""
    L = top_v.double()
    gamma = _gamma(x_aug.shape[1])
    row = x_aug[:, n_cols:n_cols + 3].double()                      # a, c, d
    col = expert_coeffs.double()[cand]                              # G, R, H, bhi, blo, A: [R, C, 6]
    E = (row.unsqueeze(1) * col[..., :3]).sum(-1)
    b = 0.0 if bias is None else bias.double()[cand]
    hi, lo, flush = col[..., 3], col[..., 4], col[..., 5]
    D = (hi + lo + flush - b) + gamma * (hi.abs() + lo.abs()) + 2 * flush
    lower = L - _U_BF16 / (1 - _U_BF16) * L.abs() - 2 * _TINY - 3 * E - D
    return lower * (1 + 2.0 ** -40) - 2 * _TINY, _upper(L)


def _upper(L: Tensor) -> Tensor:
    """U >= Z from the bf16 output L = bf16(Z) (fp64; the docstring's last step)."""
    return L + _U_BF16 / (1 - _U_BF16) * (1 + 2.0 ** -40) * L.abs() + 2 * _TINY


class _Screened:
    """What the screen leaves for rescoring: the rows' inputs and bound columns, and per row the
    screen's largest values top_v (bf16, descending) and their experts top_i."""

    def __init__(self, x, x_aug, x_norm, weight, bias, top_v, top_i, expert_coeffs):
        self.x, self.x_aug, self.x_norm = x, x_aug, x_norm
        self.weight, self.bias = weight, bias
        self.top_v, self.top_i, self.expert_coeffs = top_v, top_i, expert_coeffs


def _screen_rows(x, x_aug, x_norm, rows_ok, weight, bias, keep: int) -> Optional[_Screened]:
    screen = _screen(x_aug, x_norm, rows_ok, weight, bias, keep)
    return None if screen is None else _Screened(x, x_aug, x_norm, weight, bias, *screen)


def _rescore_certify(s: _Screened, k: int, C: int):
    """Rescore each row's first C candidates and certify: (values, indices, certified, consistent) per
    row. Certified: every non-candidate's bound is <= the k-th rescored value (no non-candidate when
    C = N). Consistent: every rescored logit lies in the screen's interval for it, widened by the
    rescoring's own fp32 rounding."""
    cand = s.top_i[:, :C]
    exact = _rescore(s.x, s.weight, s.bias, cand)
    values, pos = exact.relu().topk(k, dim=1, sorted=True)
    indices = cand.gather(1, pos)
    if C < s.weight.shape[0]:
        certified = _upper(s.top_v[:, C].double()) <= values[:, k - 1].double()
    else:
        certified = torch.ones(exact.shape[0], dtype=torch.bool)
    lower, upper = _screen_interval(s.top_v[:, :C], cand, s.x_aug, s.expert_coeffs, s.bias, s.x.shape[1])
    g_norm = s.expert_coeffs.double()[cand][..., 0]
    b_abs = 0.0 if s.bias is None else s.bias.double().abs()[cand]
    slack = _gamma(s.x.shape[1] + 2) * 1.01 * (s.x_norm.unsqueeze(1) * g_norm + b_abs) + 2 * _TINY
    e = exact.double()
    consistent = ((e >= lower - slack) & (e <= upper + slack)).all(1)
    return values, indices, certified & consistent & torch.isfinite(exact).all(1), consistent


def screened_topk_gate(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, direct: Direct):
    """topk_gate's forward on [B, I] fp32 CPU x by screening (module docstring): the same result as
    direct(x, weight, bias, k) up to ties and fp32 rounding. Each row rescores k + m candidates; a row
    left uncertified is screened again and rescores k + 3m; a row still uncertified goes to `direct`, as
    do inputs that cannot be screened."""
    if not screenable(x, weight, bias, k) or (bias is not None and not bool(torch.isfinite(bias).all())):
        _count(calls_direct=1)
        return direct(x, weight, bias, k)
    B, I = x.shape
    N = weight.shape[0]
    m = margin(k, I)
    width = -(-(I + _COEFFS) // _PAD) * _PAD
    x = x.contiguous()
    x_aug, x_norm, rows_ok = _row_side(x, width)
    screened = _screen_rows(x, x_aug, x_norm, rows_ok, weight, bias, k + m + 1)
    if screened is None:
        _count(calls_direct=1)
        return direct(x, weight, bias, k)
    values, indices, ok, consistent = _rescore_certify(screened, k, k + m)
    inconsistent = ~consistent & rows_ok
    retry = (~ok & consistent & rows_ok).nonzero().squeeze(1)
    if retry.numel():   # screen these rows again, keeping more of their experts
        again = _screen_rows(x[retry], x_aug[retry], x_norm[retry], rows_ok[retry], weight, bias,
                             min(N, k + 3 * m + 1))
        v, i, ok2, consistent2 = _rescore_certify(again, k, min(N, k + 3 * m))
        values[retry], indices[retry], ok[retry] = v, i, ok2
        inconsistent[retry] |= ~consistent2
    redo = (~(ok & rows_ok)).nonzero().squeeze(1)
    if redo.numel():
        values[redo], indices[redo] = direct(x[redo], weight, bias, k)
    _count(calls=1, rows_screened=B, rows_retried=retry.numel(), rows_fallback=redo.numel(),
           rows_inconsistent=int(inconsistent.sum()))
    return values, indices


# ---- is screening sound here, and faster? -----------------------------------------------

_support_lock = threading.RLock()   # screening_supported() asks bf16_screen_sound() inside
_support: dict = {}


def _cached(key: str, compute: Callable[[], bool]) -> bool:
    with _support_lock:
        if key not in _support:
            _support[key] = compute()
        return _support[key]


def bf16_screen_sound() -> bool:
    """Whether the bf16 GEMM runs here and follows the bound's model (checked once per process)."""
    return _cached("sound", _self_check)


def screening_supported() -> bool:
    """Whether "auto" screens: the CPU has bf16 dot-product instructions (where /proc/cpuinfo or torch
    can tell), the bf16 GEMM passes its self-check, and a one-time measurement finds it at least
    _MIN_SPEEDUP times faster than fp32."""
    return _cached("supported", lambda: _cpu_has_bf16_dot() is not False and bf16_screen_sound()
                   and _bf16_speedup() >= _MIN_SPEEDUP)


def _cpu_has_bf16_dot() -> Optional[bool]:
    """True/False from the CPU flags (x86: avx512_bf16 or amx_bf16; Arm: bf16); None if unknown."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    if "AMX" in capability or "BF16" in capability:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:
        return None
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def _check_gemm(M: int, K: int, N: int, gen: torch.Generator) -> bool:
    """_screen_mm on [M, K] x [N, K] test matrices stays within the bound's model of the exact product:
    |L - Z| <= 2^-8 (|Z| + e) + e + 2^-125, e = gamma_K sum |p|. Rows of positive terms test the output
    rounding; rows with +-4096 at both ends cancel to a modest sum, so that partial sums kept in bf16
    (spacing 32 near 4096) would break the bound; rows of mixed signs cancel too."""
    a = torch.rand(M, K, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    a[M // 3:2 * M // 3] = torch.randn(M - M // 3 - (M - 2 * M // 3), K, generator=gen, dtype=torch.float64)
    a[:M // 3, 0], a[:M // 3, K - 1] = 4096.0, -4096.0
    b = torch.rand(N, K, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    b[N // 2:] = torch.randn(N - N // 2, K, generator=gen, dtype=torch.float64)
    b[:, 0] = b[:, K - 1] = 1.0
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    L = _screen_mm(a16, b16).double()
    exact = a16.double() @ b16.double().T
    e = _gamma(K) * (a16.double().abs() @ b16.double().abs().T)
    allowed = (_U_BF16 * (exact.abs() + e) + e) * 1.001 + 2 * _TINY
    return bool(((L - exact).abs() <= allowed).all())


def _self_check() -> bool:
    gen = torch.Generator().manual_seed(0)
    try:
        return all(_check_gemm(M, K, N, gen) for M, K, N in ((37, 200, 91), (129, 1040, 263)))
    except RuntimeError:
        return False


def _bf16_speedup() -> float:
    """fp32 time / bf16 time of a GEMM of the gate's kind ([256, 776] x [1024, 776]), best of 3."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(256, 776, generator=gen)
    b = torch.randn(1024, 776, generator=gen)
    times = []
    for x, w in ((a, b), (a.to(torch.bfloat16), b.to(torch.bfloat16))):
        torch.mm(x, w.T)
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(x, w.T)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return times[0] / max(times[1], 1e-9)
