"""Triton kernels of mxd_decode: y = (z @ decoder) * (sum_j values[:, j] * experts[indices[:, j]]) + bias.

Forward: one kernel per [BLOCK_M tokens, BLOCK_N outputs] tile: the z @ decoder GEMM (tl.dot, fp32
accumulation), then in the epilogue the tile's slice of the gathered expert mixture c~ = a C (K
gathered row slices of `experts`, weighted by the values) multiplies the accumulator, the bias is
added, and y is written once. Neither z @ decoder nor c~ touches global memory.

Backward (grad_y = dL/dy):
  grad_h = grad_y * c~              dz = grad_h @ decoder^T,  ddecoder = z^T @ grad_h   (cuBLAS)
  grad_c = grad_y * (z @ decoder)   dvalues = gathered_dot(experts, indices, grad_c)
                                    dexperts = scatter_rows(indices, values, grad_c, N)
  dbias = sum_b grad_y
The same GEMM kernel recomputes z @ decoder and writes grad_c (and grad_h, from the same grad_y
tile and the gathered c~) in its epilogue; when only grad_h is needed, an embedding bag scaled by
grad_y computes it without the GEMM. Exact fp32 on a GPU (TF32 not allowed by torch) computes
z @ decoder with cuBLAS and applies the gathered epilogue in a separate embedding-bag pass (see
SPLIT_GEMM). The kernels take float16, bfloat16 and float32 operands whose in-tile offsets fit 32 bits
(forward_offsets_fit, backward_offsets_fit); the backend table (ops/_table.py of the package) runs
other arguments on the torch backend.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from mxd_fast._utils import new_empty

from ._device import LAUNCH_OPTIONS, autotune_enabled, capability, compiled, tf32_allowed
from .gather_combine import embedding_bag, gathered_dot, scatter_rows

__all__ = ["mxd_decode_forward", "mxd_decode_backward", "forward_offsets_fit", "backward_offsets_fit"]


@triton.jit
def _gather_slice(i_ptrs, v_ptrs, e_cols, j, mm, mn, K, N, s_ik, s_vk, s_en):
    """Expert j of each row of the tile: its [BLOCK_M, BLOCK_N] slice of `experts` (raw dtype; 0 where
    the row, j or the index is out of range) and its fp32 value."""
    mj = mm & ((mm.to(tl.int32) * 0 + j) < K)   # a tensor comparison (the interpreter needs one)
    n = tl.load(i_ptrs + j * s_ik, mask=mj, other=-1)
    v = tl.load(v_ptrs + j * s_vk, mask=mj, other=0).to(tl.float32)
    ok = mj & (n >= 0) & (n < N)
    n = tl.where(ok, n, 0).to(tl.int64)
    e = tl.load(e_cols[None, :] + n[:, None] * s_en, mask=ok[:, None] & mn[None, :], other=0.0)
    return e, v


@triton.jit
def _grouped_tile(B, O, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program, in grouped order: GROUP_M row tiles share the decoder
    column tiles while they sit in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BLOCK_M)
    num_n = tl.cdiv(O, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    return pid_m, pid_n


@triton.jit
def _gathered_mixture(i_ptrs, v_ptrs, e_cols, mm, mn, K, N, s_ik, s_vk, s_en,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr):
    """The tile's slice of c~ = a C: K gathered row slices of `experts`, UNROLL of them issued before
    they are summed."""
    c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for j0 in range(0, K, UNROLL):
        for u in tl.static_range(UNROLL):
            e, v = _gather_slice(i_ptrs, v_ptrs, e_cols, j0 + u, mm, mn, K, N, s_ik, s_vk, s_en)
            c += v[:, None] * e.to(tl.float32)
    return c


@triton.jit
def _tile_ptrs(ptr, row0_64, col0_64, lm, ln, s_row, s_col):
    """Pointers of a [BLOCK_M, BLOCK_N] tile of a [B, O] tensor: 64-bit origin, 32-bit in-tile offsets."""
    return ptr + row0_64 * s_row + col0_64 * s_col + (lm[:, None] * s_row + ln[None, :] * s_col)


@triton.jit
def _mxd_decode_kernel(z_ptr, dec_ptr, exp_ptr, val_ptr, idx_ptr, ct_ptr, bias_ptr, g_ptr, y_ptr, gh_ptr, gc_ptr,
                       B, H, O, N, K, B_BUCKET,
                       s_zb, s_zh, s_dh, s_do, s_en, s_eo, s_vb, s_vk, s_ib, s_ik, s_tb, s_to, s_bias,
                       s_gb, s_go, s_yb, s_yo, s_hb, s_ho, s_cb, s_co,
                       C_SOURCE: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr,
                       WRITE_GH: tl.constexpr, WRITE_GC: tl.constexpr, PRECISION: tl.constexpr,
                       DOT_FP32: tl.constexpr, UNROLL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                       GROUP_M: tl.constexpr):
    pid_m, pid_n = _grouped_tile(B, O, BLOCK_M, BLOCK_N, GROUP_M)
    # 64-bit scalar tile origins; 32-bit offsets inside a tile (the host checks they fit).
    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    lm = tl.arange(0, BLOCK_M)
    ln = tl.arange(0, BLOCK_N)
    rh = tl.arange(0, BLOCK_H)
    mm = (row0 + lm) < B
    mn = (col0 + ln) < O
    mask = mm[:, None] & mn[None, :]
    row0_64 = row0.to(tl.int64)
    col0_64 = col0.to(tl.int64)
    i_ptrs = idx_ptr + row0_64 * s_ib + lm * s_ib
    v_ptrs = val_ptr + row0_64 * s_vb + lm * s_vb
    e_cols = exp_ptr + col0_64 * s_eo + ln * s_eo

    # ---- z @ decoder -----------------------------------------------------------------
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    z_ptrs = z_ptr + row0_64 * s_zb + (lm[:, None] * s_zb + rh[None, :] * s_zh)
    d_ptrs = dec_ptr + col0_64 * s_do + (rh[:, None] * s_dh + ln[None, :] * s_do)
    n_h = tl.cdiv(H, BLOCK_H)
    if C_SOURCE == 3:
        # interleaved: one gathered expert slice every `every` GEMM steps, loaded one gather ahead of
        # its use, so that its memory latency overlaps the tensor-core work; the rest in the epilogue
        in_loop = tl.minimum(K, n_h)
        every = n_h // tl.maximum(in_loop, 1)
        c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        e_next = tl.zeros([BLOCK_M, BLOCK_N], dtype=exp_ptr.dtype.element_ty)
        v_next = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(0, n_h):
        mh = (t * BLOCK_H + rh) < H
        a = tl.load(z_ptrs, mask=mm[:, None] & mh[None, :], other=0.0)
        b = tl.load(d_ptrs, mask=mh[:, None] & mn[None, :], other=0.0)
        if DOT_FP32:  # the interpreter multiplies the raw bits of bf16 operands: upcast (exact)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        z_ptrs += BLOCK_H * s_zh
        d_ptrs += BLOCK_H * s_dh
        if C_SOURCE == 3:
            if (t % every == 0) & (t // every < in_loop):
                c += v_next[:, None] * e_next.to(tl.float32)
                e_next, v_next = _gather_slice(i_ptrs, v_ptrs, e_cols, t // every, mm, mn, K, N, s_ik, s_vk, s_en)

    # ---- epilogue: the expert mixture c~ = a C for this tile --------------------------------
    if C_SOURCE == 3:
        c += v_next[:, None] * e_next.to(tl.float32)
        for j in range(in_loop, K):
            e, v = _gather_slice(i_ptrs, v_ptrs, e_cols, j, mm, mn, K, N, s_ik, s_vk, s_en)
            c += v[:, None] * e.to(tl.float32)
    if C_SOURCE == 1:
        c = _gathered_mixture(i_ptrs, v_ptrs, e_cols, mm, mn, K, N, s_ik, s_vk, s_en, BLOCK_M, BLOCK_N, UNROLL)
    elif C_SOURCE == 2:   # precomputed by an embedding bag
        c = tl.load(_tile_ptrs(ct_ptr, row0_64, col0_64, lm, ln, s_tb, s_to), mask=mask, other=0.0).to(tl.float32)
    if WRITE_Y:
        y = acc * c
        if HAS_BIAS:
            y += tl.load(bias_ptr + col0_64 * s_bias + ln * s_bias, mask=mn, other=0.0).to(tl.float32)[None, :]
        y_ptrs = _tile_ptrs(y_ptr, row0_64, col0_64, lm, ln, s_yb, s_yo)
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_GH or WRITE_GC:
        g = tl.load(_tile_ptrs(g_ptr, row0_64, col0_64, lm, ln, s_gb, s_go), mask=mask, other=0.0).to(tl.float32)
        if WRITE_GH:
            gh_ptrs = _tile_ptrs(gh_ptr, row0_64, col0_64, lm, ln, s_hb, s_ho)
            tl.store(gh_ptrs, (g * c).to(gh_ptr.dtype.element_ty), mask=mask)
        if WRITE_GC:
            gc_ptrs = _tile_ptrs(gc_ptr, row0_64, col0_64, lm, ln, s_cb, s_co)
            tl.store(gc_ptrs, (g * acc).to(gc_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, bh, warps, stages, unroll):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh, "GROUP_M": 8, "UNROLL": unroll},
                         num_warps=warps, num_stages=stages)


# H100. The gathered epilogue holds a second fp32 tile (c~) next to the accumulator: at 128 x 128 per
# 8 warps that is ~240 registers per thread (sm_90 compile, no spills with UNROLL=1); smaller tiles
# can issue more gathers at once (UNROLL) and fit two programs per SM.
_CUDA_CONFIGS = [
    _config(128, 128, 64, 8, 3, 1),
    _config(128, 128, 32, 8, 4, 1),
    _config(128, 64, 64, 4, 4, 1),
    _config(64, 128, 64, 4, 4, 1),
    _config(64, 64, 64, 4, 4, 4),
    _config(64, 64, 32, 4, 5, 2),
]

# The interleaved gather keeps c~ and the next expert slice in registers during the GEMM loop: larger tiles
# (128 x 128 on 8 warps, 128 x 64 on 4) spill, and 256 x 64 needs more shared memory than sm_90 has.
_INTERLEAVED_CONFIGS = [
    _config(128, 64, 64, 8, 3, 1),
    _config(128, 64, 64, 8, 4, 1),
    _config(64, 128, 64, 8, 4, 1),
    _config(64, 64, 64, 4, 4, 1),
]

_PRE_HOPPER_FP32_CONFIG = _config(128, 64, 32, 4, 4, 1)

_TUNE_KEY = ["B_BUCKET", "H", "O", "K", "C_SOURCE", "HAS_BIAS", "WRITE_Y", "WRITE_GH", "WRITE_GC", "PRECISION"]
_mxd_decode_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=_TUNE_KEY)(_mxd_decode_kernel)
_mxd_decode_tuned_interleaved = triton.autotune(configs=_INTERLEAVED_CONFIGS, key=_TUNE_KEY)(_mxd_decode_kernel)

_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_H=16, GROUP_M=2, UNROLL=2, num_warps=1)


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's own matmul flag (exact fp32 unless TF32 is allowed); 16-bit inputs take
    Triton's default, which only concerns fp32 operands."""
    if dtype == torch.float32 and not tf32_allowed():
        return "ieee"
    return "tf32"


# Where the GEMM runs. "auto": exact fp32 (TF32 not allowed) on a GPU goes to cuBLAS, whose SGEMM beats
# Triton's exact fp32 dot (CUDA cores, no tensor cores), and the gathered epilogue becomes a separate
# pass over [B, O]; every other case runs the fused kernel. "always" / "never" force one path.
SPLIT_GEMM = "auto"

# Where the fused kernel's epilogue takes c~ = a C from. "gather": gathered inside the epilogue (c~
# never reaches global memory). "interleaved": gathered during the GEMM loop, one expert slice every
# few steps, each loaded a gather ahead of its use (the loads overlap the tensor-core work).
# "precomputed": an embedding-bag pass writes c~ [B, O] first (many small programs hide the gather
# latency better) and the epilogue reads it as a plain tile. None: the environment variable
# MXD_FAST_TRITON_DECODE_EPILOGUE, else "gather".
EPILOGUE_SOURCE = None
_C_SOURCE = {"gather": 1, "precomputed": 2, "interleaved": 3}


def epilogue_source() -> str:
    source = EPILOGUE_SOURCE or os.environ.get("MXD_FAST_TRITON_DECODE_EPILOGUE") or "gather"
    if source not in _C_SOURCE:
        raise ValueError(f"environment variable MXD_FAST_TRITON_DECODE_EPILOGUE must be one of "
                         f"{sorted(_C_SOURCE)}, got {source!r}")
    return source


def _split_gemm(z: Tensor) -> bool:
    if SPLIT_GEMM == "auto":
        return compiled(z) and z.dtype == torch.float32 and _precision(z.dtype) == "ieee"
    return SPLIT_GEMM == "always"


_INT32_MAX = 2 ** 31 - 1
_TILE = tuple(max(c.kwargs[name] for c in _CUDA_CONFIGS + _INTERLEAVED_CONFIGS)
              for name in ("BLOCK_M", "BLOCK_N", "BLOCK_H"))


def _span(t: Tensor, rows: int, cols: int) -> int:
    """Largest element offset inside a [rows, cols] tile of t (the kernel keeps these in 32 bits)."""
    return (rows - 1) * t.stride(0) + (cols - 1) * t.stride(1)


def _tiles_fit(z, decoder, experts, values, indices, *others) -> bool:
    bm, bn, bh = _TILE
    K = indices.shape[1]
    # bh + 1: the pointers step by BLOCK_H rows of H in 32 bits as well
    spans = [_span(z, bm, bh + 1), _span(decoder, bh + 1, bn), (bn - 1) * experts.stride(1),
             (bm - 1) * values.stride(0) + K * values.stride(1), (bm - 1) * indices.stride(0) + K * indices.stride(1)]
    spans += [_span(t, bm, bn) for t in others if t is not None]
    spans.append((bm - 1) * decoder.shape[1] + bn - 1)  # the contiguous [B, O] outputs
    return max(spans) <= _INT32_MAX


def _fit_tiles(z, decoder, experts, values, indices, *others):
    """The inputs, made contiguous where a strided view would overflow the kernel's 32-bit in-tile
    offsets; None when even contiguous tensors would."""
    if _tiles_fit(z, decoder, experts, values, indices, *others):
        return (z, decoder, experts, values, indices, *others)
    fixed = [t.contiguous() if t is not None else None for t in (z, decoder, experts, values, indices, *others)]
    return fixed if _tiles_fit(*fixed) else None


def _fit_when_contiguous(*operands) -> bool:
    """Whether _fit_tiles finds a layout for the operands; meta tensors stand in for the contiguous copies."""
    if _tiles_fit(*operands):
        return True
    return _tiles_fit(*(torch.empty(t.shape, dtype=t.dtype, device="meta") for t in operands))


def _fused(z: Tensor, decoder: Tensor) -> bool:
    """Whether a launch of this shape runs the fused kernel (its offsets limited), not the split path."""
    return z.shape[0] > 0 and decoder.shape[1] > 0 and not _split_gemm(z)


def forward_offsets_fit(z, decoder, experts, values, indices) -> bool:
    """Whether mxd_decode_forward takes these operands: the fused kernel's in-tile offsets fit 32 bits
    (operands whose strides overflow them are made contiguous), or the split path runs."""
    return not _fused(z, decoder) or _fit_when_contiguous(z, decoder, experts, values, indices)


def backward_offsets_fit(grad_y, z, decoder, experts, values, indices, need_c: bool) -> bool:
    """Whether mxd_decode_backward takes these operands; need_c: an experts or values gradient is asked
    for (only that part launches the fused kernel)."""
    return not (need_c and _fused(z, decoder)) or _fit_when_contiguous(z, decoder, experts, values, indices, grad_y)


def _refuse_float64(z: Tensor) -> None:
    if z.dtype == torch.float64:
        raise TypeError("the Triton mxd_decode kernels take float16, bfloat16 or float32 z, got float64")


def _refuse_unfit(fitted) -> None:
    if fitted is None:
        raise ValueError("the Triton mxd_decode kernel keeps in-tile offsets in 32 bits, and these operands' "
                         "exceed them even when contiguous (the torch backend takes them)")


def _launch(z, decoder, experts, values, indices, *, c_source, c_tilde=None, bias=None, grad=None, y=None,
            gh=None, gc=None):
    B, H = z.shape
    O = decoder.shape[1]
    N, K = experts.shape[0], indices.shape[1]
    any_out = next(t for t in (y, gh, gc) if t is not None)
    ct_t, bias_t, grad_t, y_t, gh_t, gc_t = (t if t is not None else any_out
                                            for t in (c_tilde, bias, grad, y, gh, gc))
    args = (z, decoder, experts, values, indices, ct_t, bias_t, grad_t, y_t, gh_t, gc_t,
            B, H, O, N, K, triton.next_power_of_2(max(B, 1)),
            z.stride(0), z.stride(1), decoder.stride(0), decoder.stride(1), experts.stride(0), experts.stride(1),
            values.stride(0), values.stride(1), indices.stride(0), indices.stride(1),
            ct_t.stride(0), ct_t.stride(1), bias_t.stride(0),
            grad_t.stride(0), grad_t.stride(1), y_t.stride(0), y_t.stride(1),
            gh_t.stride(0), gh_t.stride(1), gc_t.stride(0), gc_t.stride(1))
    flags = dict(C_SOURCE=c_source, HAS_BIAS=bias is not None, WRITE_Y=y is not None, WRITE_GH=gh is not None,
                 WRITE_GC=gc is not None, PRECISION=_precision(z.dtype),
                 DOT_FP32=not compiled(z) and z.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]) * triton.cdiv(O, meta["BLOCK_N"]),)

    interleaved = c_source == _C_SOURCE["interleaved"]
    if compiled(z) and autotune_enabled():
        (_mxd_decode_tuned_interleaved if interleaved else _mxd_decode_tuned)[grid](*args, **flags, **LAUNCH_OPTIONS)
    elif compiled(z):
        # without autotuning: the widest tile; the fused backward (two outputs) spills there, so the smallest
        if interleaved:
            c = _INTERLEAVED_CONFIGS[0]
        elif gh is not None and gc is not None:
            c = _CUDA_CONFIGS[5]
        else:
            # fp32 operands (TF32) before sm_90: 128 x 128 spills, half the columns on 4 warps does not
            c = _PRE_HOPPER_FP32_CONFIG if z.dtype == torch.float32 and capability(z) < 90 else _CUDA_CONFIGS[0]
        _mxd_decode_kernel[grid](*args, **flags, **c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages,
                                 **LAUNCH_OPTIONS)
    else:
        _mxd_decode_kernel[grid](*args, **flags, **_INTERPRETER_CONFIG, **LAUNCH_OPTIONS)


def mxd_decode_forward(z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor, indices: Tensor,
                       bias) -> Tensor:
    _refuse_float64(z)
    B = z.shape[0]
    O = decoder.shape[1]
    y = new_empty((B, O), z.dtype, z.device)
    if B == 0 or O == 0:
        return y
    if _split_gemm(z):
        torch.matmul(z, decoder, out=y)
        return embedding_bag(experts, values, indices, scale=y, bias=bias, out=y)
    fitted = _fit_tiles(z, decoder, experts, values, indices)
    _refuse_unfit(fitted)
    z, decoder, experts, values, indices = fitted
    if bias is not None and (_TILE[1] - 1) * bias.stride(0) > _INT32_MAX:   # its in-tile offset too
        bias = bias.contiguous()
    source = epilogue_source()
    c_tilde = embedding_bag(experts, values, indices) if source == "precomputed" else None
    _launch(z, decoder, experts, values, indices, c_source=_C_SOURCE[source], c_tilde=c_tilde, bias=bias, y=y)
    return y


def _backward_products(grad_y, z, decoder, experts, values, indices, need_h: bool, need_c: bool):
    """grad_h = grad_y * c~ (need_h) and grad_c = grad_y * (z @ decoder) (need_c), [B, O] each."""
    B, O = grad_y.shape
    dtype, device = z.dtype, z.device
    grad_h = grad_c = None
    if B > 0 and O > 0:
        source = epilogue_source()
        fuse_h = need_h and need_c and not _split_gemm(z) and source != "precomputed"
        if need_h and not fuse_h:
            grad_h = embedding_bag(experts, values, indices, scale=grad_y)        # grad_y * c~
        if need_c and _split_gemm(z):
            grad_c = torch.matmul(z, decoder, out=new_empty((B, O), dtype, device)).mul_(grad_y)
        elif need_c:
            grad_c = new_empty((B, O), dtype, device)
            grad_h = new_empty((B, O), dtype, device) if fuse_h else grad_h
            _launch(z, decoder, experts, values, indices, c_source=_C_SOURCE[source] if fuse_h else 0,
                    grad=grad_y, gh=grad_h if fuse_h else None, gc=grad_c)
    if need_h and grad_h is None:
        grad_h = new_empty((B, O), dtype, device).zero_()
    if need_c and grad_c is None:
        grad_c = new_empty((B, O), dtype, device).zero_()
    return grad_h, grad_c


def mxd_decode_backward(grad_y: Tensor, z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor,
                        indices: Tensor, need_z: bool, need_decoder: bool, need_experts: bool, need_values: bool,
                        need_bias: bool, deterministic: bool = True):
    _refuse_float64(z)
    B, H = z.shape
    O = decoder.shape[1]
    dtype, device = z.dtype, z.device
    need_c = need_experts or need_values
    if need_c and _fused(z, decoder):
        fitted = _fit_tiles(z, decoder, experts, values, indices, grad_y)
        _refuse_unfit(fitted)
        z, decoder, experts, values, indices, grad_y = fitted
    grad_h, grad_c = _backward_products(grad_y, z, decoder, experts, values, indices, need_z or need_decoder, need_c)

    dz = ddecoder = dexperts = dvalues = dbias = None
    if need_z:
        dz = torch.matmul(grad_h, decoder.T, out=new_empty((B, H), dtype, device))
    if need_decoder:
        ddecoder = torch.matmul(z.T, grad_h, out=new_empty((H, O), dtype, device))
    if need_values:
        dvalues = gathered_dot(experts, indices, grad_c)
    if need_experts:
        dexperts = scatter_rows(indices, values, grad_c, experts.shape[0], deterministic)
    if need_bias:
        dbias = new_empty((O,), dtype, device)
        dbias.copy_(grad_y.sum(0, dtype=torch.float32))
    return dz, ddecoder, dexperts, dvalues, dbias
