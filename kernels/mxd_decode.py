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
SPLIT_GEMM). fp64 runs the torch backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from mxd_fast._utils import new_empty
from mxd_fast.ops import mxd_decode as _torch_impl

from .gather_combine import embedding_bag, gathered_dot, scatter_rows

__all__ = ["mxd_decode_forward", "mxd_decode_backward"]


@triton.jit
def _mxd_decode_kernel(z_ptr, dec_ptr, exp_ptr, val_ptr, idx_ptr, bias_ptr, g_ptr, y_ptr, gh_ptr, gc_ptr,
                       B, H, O, N, K, B_BUCKET,
                       s_zb, s_zh, s_dh, s_do, s_en, s_eo, s_vb, s_vk, s_ib, s_ik, s_bias,
                       s_gb, s_go, s_yb, s_yo, s_hb, s_ho, s_cb, s_co,
                       GATHER: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr,
                       WRITE_GH: tl.constexpr, WRITE_GC: tl.constexpr, PRECISION: tl.constexpr,
                       DOT_FP32: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
                       GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row tiles share the decoder column tiles while they sit in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(B, BLOCK_M)
    num_n = tl.cdiv(O, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    mm = rm < B
    mn = rn < O
    rh = tl.arange(0, BLOCK_H)

    # ---- z @ decoder -----------------------------------------------------------------
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    z_ptrs = z_ptr + rm[:, None] * s_zb + rh[None, :].to(tl.int64) * s_zh
    d_ptrs = dec_ptr + rh[:, None].to(tl.int64) * s_dh + rn[None, :] * s_do
    for h0 in range(0, H, BLOCK_H):
        mh = (h0 + rh) < H
        a = tl.load(z_ptrs, mask=mm[:, None] & mh[None, :], other=0.0)
        b = tl.load(d_ptrs, mask=mh[:, None] & mn[None, :], other=0.0)
        if DOT_FP32:  # the interpreter multiplies the raw bits of bf16 operands: upcast (exact)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        z_ptrs += BLOCK_H * s_zh
        d_ptrs += BLOCK_H * s_dh

    mask = mm[:, None] & mn[None, :]
    # ---- epilogue: gathered expert mixture c~ for this tile -------------------------------
    if GATHER:
        c = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for j in range(0, K):
            n = tl.load(idx_ptr + rm * s_ib + j * s_ik, mask=mm, other=-1)
            v = tl.load(val_ptr + rm * s_vb + j * s_vk, mask=mm, other=0).to(tl.float32)
            ok = mm & (n >= 0) & (n < N)
            n = tl.where(ok, n, 0).to(tl.int64)
            e = tl.load(exp_ptr + n[:, None] * s_en + rn[None, :] * s_eo, mask=ok[:, None] & mn[None, :],
                        other=0.0).to(tl.float32)
            c += v[:, None] * e
    if WRITE_Y:
        y = acc * c
        if HAS_BIAS:
            y += tl.load(bias_ptr + rn * s_bias, mask=mn, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * s_yb + rn[None, :] * s_yo, y.to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_GH or WRITE_GC:
        g = tl.load(g_ptr + rm[:, None] * s_gb + rn[None, :] * s_go, mask=mask, other=0.0).to(tl.float32)
        if WRITE_GH:
            tl.store(gh_ptr + rm[:, None] * s_hb + rn[None, :] * s_ho, (g * c).to(gh_ptr.dtype.element_ty),
                     mask=mask)
        if WRITE_GC:
            tl.store(gc_ptr + rm[:, None] * s_cb + rn[None, :] * s_co, (g * acc).to(gc_ptr.dtype.element_ty),
                     mask=mask)


def _config(bm, bn, bh, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_H": bh, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# H100: the epilogue holds a second fp32 tile (c~) next to the accumulator, so tiles stay <= 128 x 128.
_CUDA_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 32, 8, 4),
    _config(128, 64, 64, 4, 4),
    _config(64, 128, 64, 4, 4),
    _config(64, 64, 64, 4, 4),
    _config(64, 64, 32, 4, 5),
]

_mxd_decode_tuned = triton.autotune(configs=_CUDA_CONFIGS,
                                    key=["B_BUCKET", "H", "O", "K", "GATHER", "WRITE_Y", "WRITE_GH", "WRITE_GC"],
                                    )(_mxd_decode_kernel)

_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_H=16, GROUP_M=2, num_warps=1)


def _precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's own matmul flag (exact fp32 unless TF32 is allowed); 16-bit inputs take
    Triton's default, which only concerns fp32 operands."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


# Where the GEMM runs. "auto": exact fp32 (TF32 not allowed) on a GPU goes to cuBLAS, whose SGEMM beats
# Triton's exact fp32 dot (CUDA cores, no tensor cores), and the gathered epilogue becomes a separate
# pass over [B, O]; every other case runs the fused kernel. "always" / "never" force one path.
SPLIT_GEMM = "auto"


def _split_gemm(z: Tensor) -> bool:
    if SPLIT_GEMM == "auto":
        return z.is_cuda and z.dtype == torch.float32 and _precision(z.dtype) == "ieee"
    return SPLIT_GEMM == "always"


def _launch(z, decoder, experts, values, indices, bias, grad, y, gh, gc, *, gather, write_y, write_gh, write_gc):
    B, H = z.shape
    O = decoder.shape[1]
    N, K = experts.shape[0], indices.shape[1]
    any_out = y if y is not None else (gh if gh is not None else gc)
    bias_t = bias if bias is not None else any_out
    grad_t = grad if grad is not None else any_out
    y_t = y if y is not None else any_out
    gh_t = gh if gh is not None else any_out
    gc_t = gc if gc is not None else any_out
    args = (z, decoder, experts, values, indices, bias_t, grad_t, y_t, gh_t, gc_t,
            B, H, O, N, K, triton.next_power_of_2(max(B, 1)),
            z.stride(0), z.stride(1), decoder.stride(0), decoder.stride(1), experts.stride(0), experts.stride(1),
            values.stride(0), values.stride(1), indices.stride(0), indices.stride(1),
            bias_t.stride(0) if bias is not None else 0,
            grad_t.stride(0), grad_t.stride(1), y_t.stride(0), y_t.stride(1),
            gh_t.stride(0), gh_t.stride(1), gc_t.stride(0), gc_t.stride(1))
    flags = dict(GATHER=gather, HAS_BIAS=bias is not None, WRITE_Y=write_y, WRITE_GH=write_gh, WRITE_GC=write_gc,
                 PRECISION=_precision(z.dtype), DOT_FP32=not z.is_cuda and z.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(B, meta["BLOCK_M"]) * triton.cdiv(O, meta["BLOCK_N"]),)

    if z.is_cuda:
        _mxd_decode_tuned[grid](*args, **flags)
    else:
        _mxd_decode_kernel[grid](*args, **flags, **_INTERPRETER_CONFIG)


def mxd_decode_forward(z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor, indices: Tensor,
                       bias) -> Tensor:
    if z.dtype == torch.float64:
        return _torch_impl.mxd_decode_torch_forward(z, decoder, experts, values, indices, bias)
    B = z.shape[0]
    O = decoder.shape[1]
    y = new_empty((B, O), z.dtype, z.device)
    if B == 0 or O == 0:
        return y
    if _split_gemm(z):
        torch.matmul(z, decoder, out=y)
        return embedding_bag(experts, values, indices, scale=y, bias=bias, out=y)
    _launch(z, decoder, experts, values, indices, bias, None, y, None, None,
            gather=True, write_y=True, write_gh=False, write_gc=False)
    return y


def mxd_decode_backward(grad_y: Tensor, z: Tensor, decoder: Tensor, experts: Tensor, values: Tensor,
                        indices: Tensor, need_z: bool, need_decoder: bool, need_experts: bool, need_values: bool,
                        need_bias: bool, deterministic: bool = True):
    if z.dtype == torch.float64:
        return _torch_impl.mxd_decode_torch_backward(grad_y, z, decoder, experts, values, indices, need_z,
                                                     need_decoder, need_experts, need_values, need_bias,
                                                     deterministic)
    B, H = z.shape
    O = decoder.shape[1]
    N = experts.shape[0]
    dtype, device = z.dtype, z.device
    need_h = need_z or need_decoder
    need_c = need_experts or need_values
    grad_h = grad_c = None
    if B > 0 and O > 0:
        if need_c and _split_gemm(z):
            grad_c = torch.matmul(z, decoder, out=new_empty((B, O), dtype, device)).mul_(grad_y)
            grad_h = embedding_bag(experts, values, indices, scale=grad_y) if need_h else None
        elif need_c:
            grad_c = new_empty((B, O), dtype, device)
            grad_h = new_empty((B, O), dtype, device) if need_h else None
            _launch(z, decoder, experts, values, indices, None, grad_y, None, grad_h, grad_c,
                    gather=need_h, write_y=False, write_gh=need_h, write_gc=True)
        elif need_h:
            grad_h = embedding_bag(experts, values, indices, scale=grad_y)
    if need_h and grad_h is None:
        grad_h = new_empty((B, O), dtype, device).zero_()
    if need_c and grad_c is None:
        grad_c = new_empty((B, O), dtype, device).zero_()

    dz = ddecoder = dexperts = dvalues = dbias = None
    if need_z:
        dz = torch.matmul(grad_h, decoder.T, out=new_empty((B, H), dtype, device))
    if need_decoder:
        ddecoder = torch.matmul(z.T, grad_h, out=new_empty((H, O), dtype, device))
    if need_values:
        dvalues = gathered_dot(experts, indices, grad_c)
    if need_experts:
        dexperts = scatter_rows(indices, values, grad_c, N, deterministic)
    if need_bias:
        dbias = new_empty((O,), dtype, device)
        dbias.copy_(grad_y.sum(0, dtype=torch.float32))
    return dz, ddecoder, dexperts, dvalues, dbias
