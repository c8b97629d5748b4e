"""The exact top-k gate on bfloat16 / float16 inputs, screened by one fp8 (e4m3) GEMM in Triton.

topk_gate's values are the k largest entries of relu(x @ weight.T + bias). kernels/topk_gate.py computes
every logit with bf16/fp16 tensor-core dot products. Screening computes them from e4m3 copies (fp8 dot
products, twice the bf16 rate on sm_89 / sm_90) and still returns the exact selection, as
mxd_fast/_torch/screened_gate.py does on the CPU with bf16:

1. Screen: one fused kernel computes, for each row b and expert n, an upper bound U_bn >= t_bn, the exact
   logit x_b . g_n + bias_n (derivation below), and keeps per row the keep = k + m + 1 largest relu(U)
   with topk_gate's running top-k (int64 keys, rounds, full merge, split over N with its merge kernel).
2. Rescore: the first k + m candidates of a row (largest relu(U) first) are recomputed exactly (gathered
   fp32 dot products of the bf16/fp16 inputs, plus bias, relu) and the k largest taken.
3. Certify: the row is exact when relu(U) of its (k + m + 1)-th candidate, the largest relu(U) outside
   the rescored ones, is <= v_k, the k-th rescored value (v_k >= 0, so every expert left out has
   relu(t) <= relu(U) <= v_k: at most a tie). A rescored logit outside the screen's interval for it also
   fails the row. Failed rows, rows with a non-finite entry and rows whose scale or norm is out of range
   are recomputed by the exact kernel (kernels/topk_gate.py); a non-finite or out-of-range weight or
   bias sends the whole call there. screen_stats() counts them.

The bound. Per row a power of two s_x (per expert s_g) with max |x / s_x| <= 448 = the largest e4m3
number; x' = x / s_x is exact (fp64). x8 = e4m3(x') with e4m3 subnormals set to zero (the tensor cores
never see one), r_x = x' - x8, exact in fp64; likewise g', g8, r_g. Then
    x . g = s_x s_g (x8 . g8 + r_x . g' + x8 . r_g),   |r_x . g'| + |x8 . r_g| <= ||r_x|| ||g'|| + ||x8|| ||r_g||
(Cauchy-Schwarz). The kernel's fp32 accumulator acc of the e4m3 products (each exact in fp32, a multiple
of 2^-18, so nothing underflows) satisfies |acc - x8 . g8| <= eps_acc sum_i |x8_i g8_i| <= eps_acc ||x8|| ||g8||
(accumulation model below). The kernel forms L = s_x s_g acc + bias (the scalings are exact: powers of
two within [2^-50, 2^50]) and
    U = L + a1_b c1_n + a2_b c2_n + c4_n,   a1 = s_x ||r_x||,  c1 = s_g ||g'||,  a2 = s_x ||x8||,
                                            c2 = s_g (||r_g|| + (eps_acc + 2^-20) ||g8||),  c4 = 2^-20 |bias| + 2^-120,
every coefficient computed in fp64 and rounded up to a normal fp32 number (then inflated by 1 + 2^-20).
The 2^-20 terms pay for the fp32 roundings of L, of the rank-1 sum and of the final addition (each at
most 2^-24 relative to |s_x s_g acc| + |bias| + the error terms) and the 2^-120 for products or bias
flushed to zero; the guards ||x|| max ||g|| + max |bias| <= 2^100 keep everything finite. So U >= t.

Accumulation. Hopper's fp8 MMA does not accumulate in full fp32: DeepSeek-V3's report measured about 14
retained bits on H800 and promotes partial sums to fp32 every 128 products. The model here: one MMA
instruction adds MMA_K = 32 products to its accumulator input c with an error of at most
(MMA_K + 1) 2^-MMA_BITS (|c| + sum |p|), MMA_BITS = 13 (one bit fewer than measured; the form covers
alignment of all terms to the largest exponent with truncation, flat or in a tree). Each tl.dot starts
from zero (its BLOCK_I products, J = BLOCK_I / 32 chained instructions) and its result is added to the
fp32 accumulator by an ordinary fp32 addition: max_num_imprecise_acc = MMA_K is passed, which also keeps
Triton from folding the addition into the dot (the sm_90 TTGIR shows the dot from a zero accumulator
with maxNumImpreciseAcc = 32, then an fp32 addf) and on sm_90 asks Triton to promote after every
instruction; the bound does not rely on that. Then eps_acc = e_J (1 + gamma) + gamma with
e_J = J e_1 / (1 - J e_1), e_1 = 33 2^-13 and gamma = gamma_{ceil(I / BLOCK_I)} the fp32 promotion sums'
(accumulation_error()). fp8_screen_sound() runs the kernel on inputs where a weaker accumulation (fewer
bits, or no promotion) breaks the bound, and screening is used only where it holds. It has not yet run
on a GPU: under the interpreter tl.dot is an fp32 numpy product.

Width. e4m3 keeps 4 significant bits, so ||r_x|| is a few percent of ||x'||, while the logits spread as
||x|| ||g|| / sqrt(I): the half-width U - L grows like sqrt(I) standard deviations of the logits. On
Gaussian bf16 data (this module's host code, an exact accumulation, k = 32, m = margin(k, I)) it was
0.5 standard deviations at I = 64, 1.0 at I = 256, 1.7 at I = 768 and 3.4 at I = 3072, and no row
certified at any of these widths (at I = 3072, N = 90088 a row had about 45000 experts with U above its
k-th logit). Rows certify at small widths and k (the tests: I <= 45, k <= 5), or where the k-th logit
stands that far above the rest; docs/design/screened_gate.md.

Cost: one pass over x and over the weight on the host (their e4m3 copies, fp64 residual norms), one
e4m3 GEMM with the running top-(k + m + 1) per row in the kernel, (k + m) gathered dot products per row.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import triton
import triton.language as tl

from mxd_fast._torch.screened_gate import fp64_norm_bounds, margin
from mxd_fast._utils import Counters, new_empty

from . import topk_gate as tgk
from ._device import LAUNCH_OPTIONS, capability, compiled
from .topk_gate import (_empty_running, _merge_tile, _program_rows_and_tiles, _relu_bits,
                        _topk_gate_merge_kernel, _write_running)

E4M3_MAX = 448.0
E4M3_MIN_NORMAL = 2.0 ** -6
# Products one fp8 MMA instruction adds (wgmma m64nNk32, mma.sync m16n8k32), and the fraction bits it is
# assumed to keep when it adds them to its accumulator (module docstring).
MMA_K = 32
MMA_BITS = 13
# Scales s = 2^e with |e| <= SCALE_EXP_LIMIT keep s_x s_g acc and the coefficients normal fp32 numbers.
SCALE_EXP_LIMIT = 50
_OVERFLOW = 2.0 ** 100   # rows with ||x|| max ||g|| + max |bias| above this go to the exact kernel
_FP32_SLACK = 2.0 ** -20
_ABS_SLACK = 2.0 ** -120
_U32 = 2.0 ** -24
_TINY = 2.0 ** -126
_CHUNK = 1 << 22         # elements of the fp64 copies formed at once on the host
_COLS = 4                # per-expert coefficients: s_g, c1, c2, c4


# ---- statistics --------------------------------------------------------------------------

_STAT_KEYS = ("calls", "rows_screened", "rows_fallback", "rows_inconsistent", "calls_direct")
_stats = Counters(_STAT_KEYS)


def screen_stats() -> dict:
    """Counts since the last reset: calls that screened; rows screened; rows recomputed by the exact
    kernel (uncertified, non-finite, scale or norm out of range); rows whose rescored logits contradicted
    the screen (they fall back too; nonzero means a fault in the screen or the rescoring); calls sent
    wholly to the exact kernel (inputs not screenable, weight or bias non-finite or out of range)."""
    return _stats.snapshot()


def reset_screen_stats() -> None:
    _stats.reset()


def _count(**deltas: int) -> None:
    _stats.add(**deltas)


# ---- kernel ------------------------------------------------------------------------------

@triton.jit
def _screen_tile_bits(x8_ptr, g8_ptr, b_ptr, rowc_ptr, colc_ptr, rows64, row_ok, n0, B, N, I,
                      stride_xb, stride_gn, stride_bn,
                      HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_I: tl.constexpr, MMA_K: tl.constexpr):
    """relu(U) of a [BLOCK_B, BLOCK_N] tile as int32 float bits (NaN -> 0x7FFFFFFF, masked -> -1), and
    the int32 columns. x8 [B, I] and g8 [N, I] are e4m3 with unit column stride; rowc [3, B] holds
    s_x, a1, a2 and colc [4, N] s_g, c1, c2, c4 (module docstring)."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    ii = tl.arange(0, BLOCK_I)
    x_rows = x8_ptr + rows64[:, None] * stride_xb
    g_cols = g8_ptr + cols64[None, :] * stride_gn
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + ii
        i_ok = i < I
        xt = tl.load(x_rows + i[None, :], mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        gt = tl.load(g_cols + i[:, None], mask=i_ok[:, None] & col_ok[None, :], other=0.0)
        # A fresh dot per block, promoted by an fp32 addition (not folded: max_num_imprecise_acc != 0).
        acc += tl.dot(xt, gt, max_num_imprecise_acc=MMA_K)
    sx = tl.load(rowc_ptr + rows64, mask=row_ok, other=0.0)
    a1 = tl.load(rowc_ptr + B + rows64, mask=row_ok, other=0.0)
    a2 = tl.load(rowc_ptr + 2 * B + rows64, mask=row_ok, other=0.0)
    sg = tl.load(colc_ptr + cols64, mask=col_ok, other=0.0)
    c1 = tl.load(colc_ptr + N + cols64, mask=col_ok, other=0.0)
    c2 = tl.load(colc_ptr + 2 * N + cols64, mask=col_ok, other=0.0)
    c4 = tl.load(colc_ptr + 3 * N + cols64, mask=col_ok, other=0.0)
    low = (acc * sx[:, None]) * sg[None, :]
    if HAS_BIAS:
        low += tl.load(b_ptr + cols64 * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    err = a1[:, None] * c1[None, :] + a2[:, None] * c2[None, :] + c4[None, :]
    return _relu_bits(low + err, row_ok, col_ok), cols


@triton.jit
def _screen_fwd_kernel(
    x8_ptr, g8_ptr, b_ptr, rowc_ptr, colc_ptr, val_ptr, idx_ptr, ws_ptr,
    B, N, I, SPLIT, stride_xb, stride_gn, stride_bn,
    K: tl.constexpr, K_PAD: tl.constexpr, FULL_MERGE_AT: tl.constexpr, HAS_BIAS: tl.constexpr,
    TO_WORKSPACE: tl.constexpr, MMA_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, FULL_MERGE: tl.constexpr,
):
    """topk_gate's forward kernel on the screen's relu(U) (K = keep): the K largest per row."""
    tl.static_assert(K_PAD <= BLOCK_N or not FULL_MERGE, "the full merge needs BLOCK_N >= K_PAD")
    rows64, row_ok, t_begin, t_end = _program_rows_and_tiles(B, N, SPLIT, BLOCK_B, BLOCK_N)
    run, low, thr = _empty_running(BLOCK_B, K, K_PAD)
    for t in range(t_begin, t_end):
        bits, cols = _screen_tile_bits(x8_ptr, g8_ptr, b_ptr, rowc_ptr, colc_ptr, rows64, row_ok, t * BLOCK_N,
                                       B, N, I, stride_xb, stride_gn, stride_bn,
                                       HAS_BIAS, BLOCK_B, BLOCK_N, BLOCK_I, MMA_K)
        run, low, thr = _merge_tile(run, low, thr, bits, cols, K, K_PAD, FULL_MERGE_AT, FULL_MERGE)
    _write_running(run, val_ptr, idx_ptr, ws_ptr, B, rows64, row_ok, K, K_PAD, TO_WORKSPACE)


# ---- host: scales, e4m3 copies, bound coefficients ----------------------------------------

def accumulation_error(block_i: int, n_cols: int) -> float:
    """eps_acc: |acc - x8 . g8| <= eps_acc sum |x8_i g8_i| for a kernel whose dots take BLOCK_I products
    each (J = ceil(BLOCK_I / MMA_K) chained MMA instructions) and add them up in fp32 (module docstring)."""
    per_mma = (MMA_K + 1) * 2.0 ** -MMA_BITS
    chained = -(-block_i // MMA_K) * per_mma
    per_dot = chained / (1 - chained)
    groups = -(-n_cols // block_i)
    gamma = groups * _U32 / (1 - groups * _U32)
    return per_dot * (1 + gamma) + gamma


def _f32_up(v: torch.Tensor) -> torch.Tensor:
    """The least normal-or-zero fp32 number >= v (fp64, v >= 0)."""
    y = v.float()
    y = torch.where(y.double() < v, torch.nextafter(y, y.new_full((), math.inf)), y)
    return torch.where((y > 0) & (y < _TINY), y.new_full((), _TINY), y)


def _split_e4m3(rows: torch.Tensor, out8: torch.Tensor):
    """Per row of `rows` (bf16/fp16, finite), write e4m3(rows / s) to out8 and return (the scale's
    exponent e (s = 2^e), ||rows / s||, ||e4m3 copy||, ||residual||) in fp64. Subnormal e4m3 values are
    set to zero (the residual keeps them exactly)."""
    exps, norms, n8, nr = [], [], [], []
    step = max(1, _CHUNK // max(1, rows.shape[1]))
    for r0 in range(0, rows.shape[0], step):
        part = rows[r0:r0 + step].double()
        amax = part.abs().amax(dim=1)
        mant, e = torch.frexp(amax / E4M3_MAX)        # amax / 448 = mant 2^e, mant in [0.5, 1)
        e = torch.where(mant == 0.5, e - 1, e)        # the least e with amax / 448 <= 2^e
        e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(-1000, 1000)
        scaled = torch.ldexp(part, -e.unsqueeze(1).double())
        q64 = scaled.to(torch.float8_e4m3fn).double()
        q64 = torch.where(q64.abs() < E4M3_MIN_NORMAL, torch.zeros_like(q64), q64)
        out8[r0:r0 + step] = q64.to(torch.float8_e4m3fn)   # exact
        exps.append(e)
        norms.append(fp64_norm_bounds(scaled))
        n8.append(fp64_norm_bounds(q64))
        nr.append(fp64_norm_bounds(scaled - q64))
    return torch.cat(exps), torch.cat(norms), torch.cat(n8), torch.cat(nr)


def _row_side(x: torch.Tensor):
    """x8 (e4m3 [B, I]), the row coefficients [3, B] fp32 (s_x, a1, a2), ||x|| (fp64 upper bound) and
    whether each row can be screened (finite, scale in range)."""
    finite = torch.isfinite(x).all(dim=1)
    x_safe = torch.where(finite.unsqueeze(1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    x8 = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    e, norm, n8, nr = _split_e4m3(x_safe, x8)
    scale = torch.ldexp(torch.ones_like(norm), e.double())
    inflate = 1 + _FP32_SLACK
    rowc = torch.stack([scale.float(), _f32_up(scale * nr * inflate), _f32_up(scale * n8 * inflate)])
    ok = finite & (e.abs() <= SCALE_EXP_LIMIT)
    return x8, rowc.contiguous(), scale * norm, ok


def _expert_side(weight: torch.Tensor, bias: Optional[torch.Tensor], eps_acc: float):
    """g8 (e4m3 [N, I]), the expert coefficients [4, N] fp32 (s_g, c1, c2, c4) and ||g|| (fp64 upper
    bound); None where a weight or bias is not finite or a scale is out of range."""
    if not bool(torch.isfinite(weight).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        return None
    g8 = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    e, norm, n8, nr = _split_e4m3(weight, g8)
    if bool((e.abs() > SCALE_EXP_LIMIT).any()):
        return None
    scale = torch.ldexp(torch.ones_like(norm), e.double())
    inflate = 1 + _FP32_SLACK
    b_abs = torch.zeros_like(norm) if bias is None else bias.double().abs()
    colc = torch.stack([scale.float(), _f32_up(scale * norm * inflate),
                        _f32_up(scale * (nr + (eps_acc + _FP32_SLACK) * n8) * inflate),
                        _f32_up(_FP32_SLACK * b_abs + _ABS_SLACK)])
    return g8, colc.contiguous(), scale * norm


# ---- host: the screen's launch -----------------------------------------------------------

# One small configuration for the CPU interpreter; BLOCK_I >= MMA_K (max_num_imprecise_acc <= a dot's K).
_INTERPRETER_CONFIG = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_I=32, FULL_MERGE=True)


def _config(k_pad: int, x: torch.Tensor) -> dict:
    """The launch configuration: on a GPU, topk_gate's default for 2-byte inputs (its running set's
    register budget) on at least 8 warps (the dot's result and the fp32 accumulator are two tiles), the
    small interpreter one on the CPU."""
    if compiled(x):
        c = tgk._default_config(k_pad, torch.bfloat16, capability(x))
        return dict(c.kwargs, num_warps=max(8, c.num_warps), num_stages=3)
    cfg = dict(_INTERPRETER_CONFIG, num_warps=4, num_stages=3)
    if cfg["FULL_MERGE"]:
        cfg["BLOCK_N"] = max(cfg["BLOCK_N"], k_pad)
    return cfg


def _screen(x8, rowc, g8, colc, bias, keep: int, cfg: dict, split: Optional[int] = None):
    """Per row, the `keep` largest relu(U) (fp32, descending) and their experts (int64)."""
    B, I = x8.shape
    N = g8.shape[0]
    device = x8.device
    values = new_empty((B, keep), torch.float32, device)
    indices = new_empty((B, keep), torch.int64, device)
    k_pad = tgk._next_pow2(keep)
    if split is None:
        split = tgk._choose_split(B, N, x8)
    split = max(1, min(split, N))
    to_ws = split > 1
    ws = torch.empty((split, B, k_pad) if to_ws else (1,), dtype=torch.int64, device=device)
    has_bias = bias is not None
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), split)
    _screen_fwd_kernel[grid](x8, g8, bias if has_bias else colc, rowc, colc, values, indices, ws,
                             B, N, I, split, x8.stride(0), g8.stride(0), bias.stride(0) if has_bias else 0,
                             K=keep, K_PAD=k_pad, FULL_MERGE_AT=tgk._full_merge_at(k_pad), HAS_BIAS=has_bias,
                             TO_WORKSPACE=to_ws, MMA_K=MMA_K, **cfg, num_warps=num_warps,
                             num_stages=num_stages, **LAUNCH_OPTIONS)
    if to_ws:
        block_b = 16 if k_pad <= 64 else 8 if compiled(x8) else 16
        _topk_gate_merge_kernel[(triton.cdiv(B, block_b),)](ws, values, indices, B, split, B * k_pad,
                                                             K=keep, K_PAD=k_pad, BLOCK_B=block_b,
                                                             **LAUNCH_OPTIONS)
    return values, indices


class _Prepared:
    """The screen's inputs for one call: e4m3 copies, coefficients, norms, and the rows it may screen."""

    def __init__(self, x, weight, bias, cfg: dict):
        self.cfg = cfg
        self.eps_acc = accumulation_error(cfg["BLOCK_I"], x.shape[1])
        self.x8, self.rowc, self.x_norm, self.rows_ok = _row_side(x)
        side = _expert_side(weight, bias, self.eps_acc)
        self.ok = side is not None
        if self.ok:
            self.g8, self.colc, self.g_norm = side
            b_max = 0.0 if bias is None else float(bias.double().abs().max())
            self.rows_ok &= self.x_norm * float(self.g_norm.max()) + b_max <= _OVERFLOW


# ---- rescore, certify ---------------------------------------------------------------------

def _rescore(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cand: torch.Tensor):
    """fp32 logits x_b . g_n + bias_n of each row's candidates n ([B, C] -> [B, C]): products of the
    bf16/fp16 inputs (exact in fp32) summed in fp32, as the exact kernel does up to summation order."""
    B, C = cand.shape
    out = torch.empty(B, C, dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK // max(1, C * x.shape[1]))
    for r0 in range(0, B, step):
        rows = weight[cand[r0:r0 + step]].float()                       # [R, C, I]
        out[r0:r0 + step] = (rows * x[r0:r0 + step].float().unsqueeze(1)).sum(-1)
    return out if bias is None else out.add_(bias.float()[cand])


def _interval(prep: _Prepared, u: torch.Tensor, cand: torch.Tensor, bias: Optional[torch.Tensor]):
    """(lower, upper) fp64 bounds on relu(t) of the candidates from their relu(U) [R, C]: t <= U, and
    where U > 0, t >= L - E >= U - 2^-23 U - 2 E (E: the error terms, recomputed here in fp64), widened
    by the rescoring's own fp32 rounding."""
    up = u.double()
    rowc, colc = prep.rowc.double(), prep.colc.double()[:, cand]                     # [3, B], [4, B, C]
    err = rowc[1].unsqueeze(1) * colc[1] + rowc[2].unsqueeze(1) * colc[2] + colc[3]
    lower = torch.where(up > 0, up * (1 - 2.0 ** -23) - 2 * err * (1 + _FP32_SLACK), -math.inf)
    b_abs = 0.0 if bias is None else bias.double().abs()[cand]
    n_cols = prep.x8.shape[1]
    gamma = (n_cols + 2) * _U32 / (1 - (n_cols + 2) * _U32)
    slack = gamma * 1.01 * (prep.x_norm.unsqueeze(1) * prep.g_norm[cand] + b_abs) + 4 * _TINY
    return lower - slack, up + slack


def _certify(prep: _Prepared, x, weight, bias, u: torch.Tensor, idx: torch.Tensor, k: int, C: int):
    """Rescore each row's first C candidates: (values fp32 [B, k] descending, indices, certified,
    consistent). Certified: relu(U) of candidate C + 1 (the largest outside the rescored ones) <= the
    k-th rescored value, the row consistent and its rescored logits finite. Consistent: each rescored
    relu(t) lies in the screen's interval for it."""
    cand = idx[:, :C]
    exact = _rescore(x, weight, bias, cand).relu()
    values, pos = exact.topk(k, dim=1, sorted=True)
    indices = cand.gather(1, pos)
    certified = u[:, C] <= values[:, k - 1]
    lower, upper = _interval(prep, u[:, :C], cand, bias)
    e = exact.double()
    consistent = ((e >= lower) & (e <= upper)).all(dim=1)
    return values, indices, certified & consistent & torch.isfinite(exact).all(dim=1), consistent


# ---- public -------------------------------------------------------------------------------

def fp8_supported(x: torch.Tensor) -> bool:
    """torch has e4m3 and the kernels on x run where fp8 dot products exist (sm_89+, or the interpreter)."""
    return hasattr(torch, "float8_e4m3fn") and (not compiled(x) or capability(x) >= 89)


def screenable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int) -> bool:
    """Whether the screen applies at all: bf16/fp16 x and weight of one dtype, at least one row and
    column, 1 <= k and more than k + m experts, fp8 here, and the accumulation self-check passed."""
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or x.dim() != 2:
        return False
    if x.shape[0] == 0 or x.shape[1] == 0 or k < 1 or weight.shape[0] <= k + margin(k, x.shape[1]):
        return False
    return fp8_supported(x) and fp8_screen_sound(x.device)


def screened_topk_gate_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int,
                               split: Optional[int] = None):
    """kernels.topk_gate.topk_gate_forward's contract ((values [B, k] in x's dtype, descending; indices
    [B, k] int64) of relu(x @ weight.T + bias)), screened in e4m3 where screenable(); uncertified rows
    and what cannot be screened go to the exact kernel. split: programs over N (tests)."""
    if x.dtype == torch.float64:
        raise TypeError("the Triton topk_gate kernel takes float16, bfloat16 or float32 x, got float64")
    if k > tgk.MAX_K:
        raise ValueError(f"the Triton topk_gate kernel takes k <= {tgk.MAX_K}, got k = {k}")
    if weight.shape[0] > tgk.MAX_N:
        raise ValueError(f"the Triton topk_gate kernel takes at most {tgk.MAX_N} experts, got N = {weight.shape[0]}")
    if not screenable(x, weight, bias, k):
        _count(calls_direct=1)
        return tgk.topk_gate_forward(x, weight, bias, k)
    B, N = x.shape[0], weight.shape[0]
    C = k + margin(k, x.shape[1])
    prep = _Prepared(x, weight, bias, _config(tgk._next_pow2(C + 1), x))
    if not prep.ok:
        _count(calls_direct=1)
        return tgk.topk_gate_forward(x, weight, bias, k)
    u, idx = _screen(prep.x8, prep.rowc, prep.g8, prep.colc, bias, C + 1, prep.cfg, split)
    values, indices, ok, consistent = _certify(prep, x, weight, bias, u, idx, k, C)
    out_values = new_empty((B, k), x.dtype, x.device)
    out_indices = new_empty((B, k), torch.int64, x.device)
    out_values.copy_(values)
    out_indices.copy_(indices)
    redo = (~(ok & prep.rows_ok)).nonzero().squeeze(1)
    if redo.numel():
        out_values[redo], out_indices[redo] = tgk.topk_gate_forward(x[redo], weight, bias, k)
    _count(calls=1, rows_screened=B, rows_fallback=redo.numel(),
           rows_inconsistent=int((~consistent & prep.rows_ok).sum()))
    return out_values, out_indices


# ---- does the bound hold on this device? -------------------------------------------------

_sound_lock = threading.Lock()
_sound: dict = {}


def fp8_screen_sound(device) -> bool:
    """Whether the screen's bound holds on `device` (checked once per process and device): the kernel
    on adversarial inputs (adversarial_inputs()) gives no relu(U) below the exact relu(t). Not yet run
    on a GPU."""
    device = torch.device(device)
    key = (device.type, device.index)
    with _sound_lock:
        if key not in _sound:
            try:
                _sound[key] = bound_violations(*adversarial_inputs(device)) == 0
            except RuntimeError:
                _sound[key] = False
        return _sound[key]


def _kernel_screen(prep: _Prepared, bias, keep: int):
    return _screen(prep.x8, prep.rowc, prep.g8, prep.colc, bias, keep, prep.cfg)


def screen_all(x, weight, bias, screen=_kernel_screen):
    """relu(U) of every (row, expert) [B, N] fp32 (the screen keeping all N), for checks of the bound;
    screen(prep, bias, keep) -> (values, indices) is the screen under test."""
    N = weight.shape[0]
    prep = _Prepared(x, weight, bias, _config(tgk._next_pow2(N), x))
    if not prep.ok:
        raise ValueError("weight or bias: not finite or out of the screen's range")
    u, idx = screen(prep, bias, N)
    return torch.full_like(u, math.nan).scatter_(1, idx, u)


def bound_violations(x, weight, bias, screen=_kernel_screen) -> int:
    """(row, expert) pairs where relu(U) < relu(t), t the exact logit in fp64, over the rows the screen
    takes."""
    prep_rows = _row_side(x)[3]
    u = screen_all(x, weight, bias, screen).double()
    t = x.double() @ weight.double().T
    if bias is not None:
        t += bias.double()
    return int(((u < t.relu()) | u.isnan())[prep_rows].sum())


def adversarial_inputs(device, dtype=torch.bfloat16, n_cols: int = 1024):
    """(x, weight, None) in e4m3-exact values (the residual terms vanish, leaving the accumulation term
    alone): per s in 10 .. 18, rows of one 16 then 16 * 2^(-s/2) (products 2^-s of the largest: one
    instruction keeping fewer bits, or no promotion to fp32 after it, drops them all), rows with a 16
    at the start of every 32 products, and random rows. The weight has the same rows."""
    rows = []
    for s in (10, 12, 14, 16, 18):
        small = 16.0 * 2.0 ** (-s / 2)
        one = torch.full((n_cols,), small, dtype=torch.float64)
        one[0] = 16.0
        per_block = torch.full((n_cols,), small, dtype=torch.float64)
        per_block[::MMA_K] = 16.0
        rows += [one, per_block]
    gen = torch.Generator().manual_seed(0)
    rows += list(torch.randn(6, n_cols, generator=gen, dtype=torch.float64).to(torch.float8_e4m3fn).double())
    x = torch.stack(rows).to(device=device, dtype=dtype)
    return x, x.clone(), None
