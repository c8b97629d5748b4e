"""Triton kernels of topk_gate: relu(x @ weight.T + bias) and its exact top-k, fused.

Forward
-------
One program owns BLOCK_B rows of x and one contiguous chunk of the experts (N). It walks its chunk
in tiles of BLOCK_N experts; for each tile it computes the [BLOCK_B, BLOCK_N] logits with tl.dot
over I (fp32 accumulation), adds the bias, applies relu and merges the tile into a running top-k
held in registers. The [B, N] logits never reach global memory.

Every logit is packed with its expert index into one int64 key that sorts like the value:

    key = (bits(relu(logit)) << 32) | n

relu(logit) >= 0, so the float32 bit pattern read as an int32 orders like the value; NaN is given
the largest pattern (0x7FFFFFFF) so that it ranks above +inf, like torch.topk. Keys are distinct
(the index breaks ties), so every selection below is exact, and for a given configuration the
choice among tied values is deterministic.

The running top-k is an unsorted set of K_PAD keys per row (K_PAD = next power of two >= k); the
K_PAD - k surplus slots hold a sentinel larger than any key, so the row's minimum is its k-th
largest key: the threshold. Per tile:
  1. one int32 comparison per logit against the row's threshold value marks the candidates (a
     logit equal to the threshold value is not one: between equal values any choice is right,
     and relu's zeros stop competing once a row holds k of them); a tile in which no row of the
     block has a candidate costs nothing more;
  2. rounds (the steady state, few candidates): as many as the largest candidate count of a row
     in the block, at most k (candidates go in largest first, so no row inserts more); a round
     finds each row's largest remaining candidate with two int32 max reductions (value bits, then
     the largest column holding them), puts it in the slot of the row's minimum key if it beats
     it, and retires it from the tile;
  3. with FULL_MERGE (a configuration option, for small k: it needs the tile as int64 keys in
     registers) a tile with more than FULL_MERGE_AT candidates (the first tiles of a chunk) is
     merged at once: tl.topk of the tile's candidates (sorted), the running set sorted, and their
     element-wise maximum after flipping one of them is the top-K_PAD of the union.
At the end the set is sorted. With one chunk (SPLIT = 1) the program writes values and indices;
otherwise it writes its sorted keys to a [SPLIT, B, K_PAD] workspace and a second, small kernel
merges the SPLIT sorted lists of every row (max with the flipped list, then a bitonic merge).
Splitting N keeps the GPU busy when B is small; each chunk restarts its threshold, so the split is
kept as small as the occupancy allows.

The kernels take float16, bfloat16 and float32, k <= MAX_K and N <= MAX_N; the backend table
(ops/_table.py of the package) runs other arguments on the torch backend.

Backward
--------
grad_logits = where(values <= 0, 0, grad_values) (the relu mask, NaN passing as in torch.relu); dx is
an embedding-bag of the selected rows of weight, dweight and dbias are K-sparse row scatters; the
building blocks live in kernels/gather_combine.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mxd_fast._utils import new_empty, relu_masked

from ._device import (LAUNCH_OPTIONS, autotune_enabled, capability, compiled, multiprocessor_count,
                      shared_memory_limit, tf32_allowed)
from .gather_combine import build_csr, embedding_bag, scatter_rows, scatter_sum

# Largest k the running top-k holds in registers.
MAX_K = 256

# Expert indices live in the low 32 bits of a key (and tile offsets in int32).
MAX_N = 2 ** 31 - 4096

_KEY_MIN = tl.constexpr(-(1 << 63))
_KEY_MAX = tl.constexpr((1 << 63) - 1)
# Bits of a NaN logit: above every other (non-negative) float32 pattern, including +inf.
_NAN_BITS = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _relu_bits(t, row_ok, col_ok):
    """relu(t) of a [rows, cols] fp32 tile as int32 float bits: every negative float (and -0.0) reads as a
    negative int32, so relu is a max with 0; NaN (of either sign) gets the top pattern; masked rows and
    columns -1."""
    bits = tl.maximum(t.to(tl.int32, bitcast=True), 0)
    bits = tl.where(t != t, _NAN_BITS, bits)
    return tl.where(row_ok[:, None] & col_ok[None, :], bits, -1)


@triton.jit
def _tile_bits(x_ptr, w_ptr, b_ptr, rows64, row_ok, n0, N, I,
               stride_xb, stride_xi, stride_wn, stride_wi, stride_bn,
               HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
               DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """The [BLOCK_B, BLOCK_N] relu'd logits of experts n0 .. n0 + BLOCK_N as int32 float bits
    (NaN -> 0x7FFFFFFF, -0.0 -> 0, masked rows and columns -> -1), and the int32 column indices."""
    cols = n0 + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols64 = cols.to(tl.int64)
    ii = tl.arange(0, BLOCK_I)
    x_rows = x_ptr + rows64[:, None] * stride_xb
    w_cols = w_ptr + cols64[None, :] * stride_wn
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        i = i0 + ii
        i_ok = i < I
        i64 = i.to(tl.int64)
        xt = tl.load(x_rows + i64[None, :] * stride_xi, mask=row_ok[:, None] & i_ok[None, :], other=0.0)
        wt = tl.load(w_cols + i64[:, None] * stride_wi, mask=i_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_UPCAST:  # the CPU interpreter's tl.dot mishandles bfloat16
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols64 * stride_bn, mask=col_ok, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    return _relu_bits(acc, row_ok, col_ok), cols


@triton.jit
def _topk_gate_fwd_kernel(
    x_ptr, w_ptr, b_ptr, val_ptr, idx_ptr, ws_ptr,
    B, N, I, SPLIT,
    stride_xb, stride_xi, stride_wn, stride_wi, stride_bn,
    B_BUCKET,  # autotuning key only
    K: tl.constexpr, K_PAD: tl.constexpr, FULL_MERGE_AT: tl.constexpr, HAS_BIAS: tl.constexpr,
    TO_WORKSPACE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, FULL_MERGE: tl.constexpr,
):
    tl.static_assert(K_PAD <= BLOCK_N or not FULL_MERGE, "the full merge needs BLOCK_N >= K_PAD")
    rows64, row_ok, t_begin, t_end = _program_rows_and_tiles(B, N, SPLIT, BLOCK_B, BLOCK_N)
    run, low, thr = _empty_running(BLOCK_B, K, K_PAD)
    for t in range(t_begin, t_end):
        bits, cols = _tile_bits(x_ptr, w_ptr, b_ptr, rows64, row_ok, t * BLOCK_N, N, I,
                                stride_xb, stride_xi, stride_wn, stride_wi, stride_bn,
                                HAS_BIAS, BLOCK_B, BLOCK_N, BLOCK_I, DOT_PRECISION, DOT_UPCAST)
        run, low, thr = _merge_tile(run, low, thr, bits, cols, K, K_PAD, FULL_MERGE_AT, FULL_MERGE)
    _write_running(run, val_ptr, idx_ptr, ws_ptr, B, rows64, row_ok, K, K_PAD, TO_WORKSPACE)


@triton.jit
def _program_rows_and_tiles(B, N, SPLIT, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_B rows (int64, and which exist) and its range [t_begin, t_end) of the
    BLOCK_N-expert tiles: program (pid_b, pid_s) owns row block pid_b and chunk pid_s of SPLIT over N."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    n_tiles = tl.cdiv(N, BLOCK_N)
    tiles_per_split = tl.cdiv(n_tiles, SPLIT)
    t_begin = tl.program_id(1) * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    return rows.to(tl.int64), rows < B, t_begin, t_end


@triton.jit
def _write_running(run, val_ptr, idx_ptr, ws_ptr, B, rows64, row_ok, K: tl.constexpr, K_PAD: tl.constexpr,
                   TO_WORKSPACE: tl.constexpr):
    """The running set, sorted: as values and indices, or as keys into this chunk's slice of the
    [SPLIT, B, K_PAD] workspace for the merge kernel."""
    run = _sorted_running(run)
    slots = tl.arange(0, K_PAD)
    if TO_WORKSPACE:
        ws = ws_ptr + (tl.program_id(1).to(tl.int64) * B + rows64[:, None]) * K_PAD + slots[None, :]
        tl.store(ws, run, mask=row_ok[:, None])
    else:
        _store_keys(val_ptr, idx_ptr, run, rows64, row_ok, slots, K)


@triton.jit
def _empty_running(BLOCK_B: tl.constexpr, K: tl.constexpr, K_PAD: tl.constexpr):
    """The running set of BLOCK_B rows before any tile: k distinct keys below every real key, then the
    sentinels; with each row's k-th largest key (low) and its value bits (thr)."""
    slots = tl.arange(0, K_PAD)
    init = tl.where(slots < K, -(slots.to(tl.int64) + 1), _KEY_MAX)
    run = tl.broadcast_to(init[None, :], [BLOCK_B, K_PAD])
    low = tl.min(run, axis=1)  # the k-th largest key of each row
    thr = (low >> 32).to(tl.int32)  # ... and its value bits
    return run, low, thr


@triton.jit
def _merge_tile(run, low, thr, bits, cols, K: tl.constexpr, K_PAD: tl.constexpr, FULL_MERGE_AT: tl.constexpr,
                FULL_MERGE: tl.constexpr):
    """Merge a tile (bits: int32 [BLOCK_B, BLOCK_N] as from _tile_bits, -1 where masked; cols: its int32
    columns) into the running set; returns the new (run, low, thr)."""
    # Candidates keep their bits, the rest become -1. A logit equal to the threshold value may
    # be dropped: between equal values any of them is fine.
    bits = tl.where(bits > thr[:, None], bits, -1)
    # Candidates are inserted largest first, so a row inserts at most K of a tile: after K, the
    # set holds K of the tile's larger candidates, and every later one ranks below them.
    count = tl.minimum(tl.max(tl.sum((bits >= 0).to(tl.int32), axis=1), axis=0), K)
    if count > 0:
        if FULL_MERGE and count > FULL_MERGE_AT:
            key = (bits.to(tl.int64) << 32) | cols.to(tl.int64)[None, :]
            top = tl.topk(tl.where(bits >= 0, key, _KEY_MIN), K_PAD)
            run = tl.maximum(tl.sort(run, descending=True), tl.flip(top, 1))
            low = tl.min(run, axis=1)
        else:
            # One round moves each row's largest remaining candidate into the slot of the row's
            # smallest key and retires it from the tile. Int32 work on the tile: the largest
            # bits, then the largest column holding them (which identifies the element).
            for _ in range(count):
                best_bits = tl.max(bits, axis=1)
                best_col = tl.max(tl.where(bits == best_bits[:, None], cols[None, :], -1), axis=1)
                best = (best_bits.to(tl.int64) << 32) | best_col.to(tl.int64)
                take = (best_bits >= 0) & (best > low)
                run = tl.where((run == low[:, None]) & take[:, None], best[:, None], run)
                low = tl.min(run, axis=1)
                bits = tl.where(cols[None, :] == best_col[:, None], -1, bits)
        thr = (low >> 32).to(tl.int32)
    return run, low, thr


@triton.jit
def _sorted_running(run):
    """The running set sorted descending, sentinels (surplus slots) last as the smallest key."""
    run = tl.where(run == _KEY_MAX, _KEY_MIN, run)
    return tl.sort(run, descending=True)


@triton.jit
def _store_keys(val_ptr, idx_ptr, keys, rows64, row_ok, slots, K: tl.constexpr):
    bits = (keys >> 32).to(tl.int32)
    values = bits.to(tl.float32, bitcast=True)
    index = keys & 0xFFFFFFFF
    off = rows64[:, None] * K + slots[None, :]
    mask = row_ok[:, None] & (slots < K)[None, :]
    tl.store(val_ptr + off, values.to(val_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + off, index, mask=mask)


@triton.jit
def _topk_gate_merge_kernel(ws_ptr, val_ptr, idx_ptr, B, SPLIT, split_stride,
                            K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_B: tl.constexpr):
    """Top-k of the SPLIT sorted key lists of each row: max with the flipped list keeps the top
    K_PAD of the union as a bitonic sequence, a bitonic merge sorts it again."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    slots = tl.arange(0, K_PAD)
    ptrs = ws_ptr + rows64[:, None] * K_PAD + slots[None, :]
    run = tl.load(ptrs, mask=row_ok[:, None], other=_KEY_MIN)
    for _ in range(1, SPLIT):
        ptrs += split_stride
        part = tl.load(ptrs, mask=row_ok[:, None], other=_KEY_MIN)
        run = tl.maximum(run, tl.flip(part, 1))
        run = tl.bitonic_merge(run, descending=True)
    _store_keys(val_ptr, idx_ptr, run, rows64, row_ok, slots, K)


# ---- configuration -----------------------------------------------------------------------

# (BLOCK_B, BLOCK_N, BLOCK_I, num_warps, num_stages, FULL_MERGE) for Hopper-class GPUs. The
# running set costs BLOCK_B * K_PAD int64 registers, so large k wants few rows per program; the
# bitonic tile merge needs the whole tile as int64 keys and is kept for small k (see _fits).
_CUDA_CONFIGS = [
    (64, 128, 64, 4, 4, False), (64, 128, 64, 8, 3, False), (128, 128, 64, 8, 3, False),
    (64, 64, 128, 4, 4, False), (128, 64, 64, 4, 4, False), (64, 256, 64, 8, 3, False),
    (32, 128, 64, 4, 4, False), (16, 128, 128, 4, 3, False), (32, 128, 64, 8, 3, False),
    (64, 128, 32, 8, 3, False), (32, 128, 32, 8, 3, False),  # fp32 (tf32x3 needs more registers)
    (64, 128, 64, 8, 3, True), (64, 128, 64, 4, 4, True), (64, 64, 128, 4, 4, True),
]


def _cuda_configs():
    return [triton.Config(dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_I=bi, FULL_MERGE=fm), num_warps=w, num_stages=st)
            for bb, bn, bi, w, st, fm in _CUDA_CONFIGS]


def _fits(cfg: dict, k_pad: int, num_warps: int, num_stages: int = 1, elem_bytes: int = 2,
          shared_memory: Optional[int] = None) -> bool:
    """Whether a configuration keeps its registers in budget (checked against ptxas for sm_90:
    beyond these bounds the kernel spills) and, given the GPU's limit, its pipelined x and weight
    tiles in shared memory."""
    bb, bn = cfg["BLOCK_B"], cfg["BLOCK_N"]
    if shared_memory is not None and num_stages * (bb + bn) * cfg["BLOCK_I"] * elem_bytes > shared_memory:
        return False
    # int64 running set: 2 * BLOCK_B * K_PAD / threads registers per thread; keep it under 64.
    if 2 * bb * k_pad > 64 * 32 * num_warps:
        return False
    if cfg["FULL_MERGE"]:
        return bn >= k_pad and k_pad * bb * bn <= 65536 * num_warps
    return True


def _prune(configs, named_args, **kwargs):
    k_pad, x = kwargs["K_PAD"], named_args["x_ptr"]
    limit = shared_memory_limit(x)
    fit = [c for c in configs if _fits(c.kwargs, k_pad, c.num_warps, c.num_stages, x.element_size(), limit)]
    return fit or [_default_config(k_pad, x.dtype, capability(x))]


def _default_config(k_pad: int, dtype: torch.dtype, cap: int) -> triton.Config:
    """The configuration used without autotuning (MXD_FAST_AUTOTUNE=0), chosen to compile without register
    spills (checked against ptxas for sm_80 and sm_90). On sm_90, 64 rows per program let Triton use wgmma;
    before sm_90 (mma.sync, more registers per tile) k = 64 and 128 and fp32 take 32 rows, on 8 warps
    (16 at k = 256)."""
    pre_hopper = cap < 90
    bb = 64 if k_pad <= 128 else 16
    if dtype == torch.float32:
        if pre_hopper and k_pad <= 128:
            return triton.Config(dict(BLOCK_B=32, BLOCK_N=64, BLOCK_I=32, FULL_MERGE=False), num_warps=8, num_stages=3)
        bn = 64 if k_pad == 128 else 128
        return triton.Config(dict(BLOCK_B=bb, BLOCK_N=bn, BLOCK_I=32, FULL_MERGE=False), num_warps=8, num_stages=3)
    if pre_hopper and k_pad in (64, 128):
        bb = 32
    # sm_90: the running set's register bound of _fits
    warps = (16 if k_pad >= 256 else 8) if pre_hopper else max(4, bb * k_pad // 1024)
    return triton.Config(dict(BLOCK_B=bb, BLOCK_N=128, BLOCK_I=64, FULL_MERGE=False),
                         num_warps=warps, num_stages=4 if warps == 4 and bb > 16 else 3)


_tuned_fwd_kernel = triton.autotune(
    configs=_cuda_configs(), key=["I", "N", "K", "HAS_BIAS", "SPLIT", "B_BUCKET", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune},
)(_topk_gate_fwd_kernel)

# One small configuration for the CPU interpreter (autotuning there is slow and meaningless).
_INTERPRETER_CONFIG = dict(BLOCK_B=16, BLOCK_N=32, BLOCK_I=16, FULL_MERGE=True)
# Programs the split over N aims for on a GPU, per streaming multiprocessor.
_PROGRAMS_PER_SM = 1
# Smallest chunk of experts worth a split of its own: every chunk pays again for filling its
# running top-k before the threshold filters well.
_MIN_SPLIT_EXPERTS = 4096


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _full_merge_at(k_pad: int) -> int:
    """Candidate count of a tile above which one bitonic merge (tl.topk over the tile: about
    log2(K_PAD) * (log2(K_PAD) + 3) / 2 compare-exchange passes) is cheaper than that many rounds
    (one pass each)."""
    log_k = k_pad.bit_length() - 1
    return log_k * (log_k + 3) // 2


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "tf32"  # only read for float32 inputs
    # fp32 follows torch's matmul precision setting: tf32 only where torch allows it.
    return "tf32" if tf32_allowed() else "tf32x3"


def _choose_split(B: int, N: int, x: torch.Tensor) -> int:
    if not compiled(x):
        return 1
    sms = multiprocessor_count(x)
    row_blocks = triton.cdiv(B, 64)
    want = triton.cdiv(_PROGRAMS_PER_SM * sms, row_blocks)
    return max(1, min(want, N // _MIN_SPLIT_EXPERTS, 64))


def _forward(x, weight, bias, k, split=None, config=None):
    B, I = x.shape
    N = weight.shape[0]
    device = x.device
    values = new_empty((B, k), x.dtype, device)
    indices = new_empty((B, k), torch.int64, device)
    if B == 0:
        return values, indices
    if compiled(x):
        # Loads along a unit-stride dimension are vectorised and pipelined (cp.async); without
        # one, a copy is cheaper than the element-wise loads.
        if 1 not in x.stride():
            x = x.contiguous()
        if 1 not in weight.stride():
            weight = weight.contiguous()
    k_pad = _next_pow2(k)
    if split is None:
        split = _choose_split(B, N, x)
    split = max(1, min(split, N))
    to_ws = split > 1
    ws = torch.empty((split, B, k_pad) if to_ws else (1,), dtype=torch.int64, device=device)
    has_bias = bias is not None
    b_arg = bias if has_bias else x
    b_stride = bias.stride(0) if has_bias else 0
    args = (x, weight, b_arg, values, indices, ws, B, N, I, split,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), b_stride,
            min(_next_pow2(B), 4096))
    meta = dict(K=k, K_PAD=k_pad, FULL_MERGE_AT=_full_merge_at(k_pad), HAS_BIAS=has_bias, TO_WORKSPACE=to_ws,
                DOT_PRECISION=_dot_precision(x.dtype), DOT_UPCAST=not compiled(x))
    if config is None and compiled(x) and autotune_enabled():
        grid = lambda m: (triton.cdiv(B, m["BLOCK_B"]), split)  # noqa: E731
        _tuned_fwd_kernel[grid](*args, **meta, **LAUNCH_OPTIONS)
    else:
        if config is None and compiled(x):
            c = _default_config(k_pad, x.dtype, capability(x))
            config = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        cfg = dict(_INTERPRETER_CONFIG, **(config or {}))
        if cfg["FULL_MERGE"]:
            cfg["BLOCK_N"] = max(cfg["BLOCK_N"], k_pad)
        num_warps = cfg.pop("num_warps", 4)
        num_stages = cfg.pop("num_stages", 3)
        grid = (triton.cdiv(B, cfg["BLOCK_B"]), split)
        _topk_gate_fwd_kernel[grid](*args, **meta, **cfg, num_warps=num_warps, num_stages=num_stages,
                                    **LAUNCH_OPTIONS)
    if to_ws:
        block_b = 16 if k_pad <= 64 else 8 if compiled(x) else 16
        _topk_gate_merge_kernel[(triton.cdiv(B, block_b),)](ws, values, indices, B, split, B * k_pad,
                                                             K=k, K_PAD=k_pad, BLOCK_B=block_b, **LAUNCH_OPTIONS)
    return values, indices


def topk_gate_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], k: int):
    """(values [B, k] sorted descending, indices [B, k] int64) of relu(x @ weight.T + bias)."""
    if x.dtype == torch.float64:
        raise TypeError("the Triton topk_gate kernel takes float16, bfloat16 or float32 x, got float64")
    if k > MAX_K:
        raise ValueError(f"the Triton topk_gate kernel takes k <= {MAX_K}, got k = {k}")
    if weight.shape[0] > MAX_N:
        raise ValueError(f"the Triton topk_gate kernel takes at most {MAX_N} experts, got N = {weight.shape[0]}")
    return _forward(x, weight, bias, k)


# ---- backward ----------------------------------------------------------------------------

def topk_gate_backward(grad_values, x, weight, values, indices, need_x: bool, need_weight: bool,
                       need_bias: bool, deterministic: bool):
    B, I = x.shape
    N = weight.shape[0]
    device = x.device
    grad_logits = relu_masked(grad_values, values)
    dx = dweight = dbias = None
    if B == 0:
        if need_x:
            dx = new_empty((0, I), x.dtype, device)
        if need_weight:
            dweight = new_empty((N, I), weight.dtype, device).zero_()
        if need_bias:
            dbias = new_empty((N,), weight.dtype, device).zero_()
        return dx, dweight, dbias
    if need_x:
        dx = embedding_bag(weight, grad_logits, indices)
    # One reverse index for both deterministic scatters of the same selection.
    csr = build_csr(indices, N) if need_weight and need_bias and deterministic else None
    if need_weight:
        dweight = scatter_rows(indices, grad_logits, x, N, deterministic, csr=csr)
    if need_bias:
        dbias = scatter_sum(indices, grad_logits, N, deterministic, csr=csr)
    return dx, dweight, dbias
