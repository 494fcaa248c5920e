"""Fused masked BatchNorm2d (+ optional ReLU) in Triton: forward, backward and running statistics.

    y = (x - mean) * rstd * (gamma * m) + beta,   rstd = 1 / sqrt(var + eps)   (bias not masked)
    y = max(y, 0)                                                               (relu=True)

Layout. x is [N, C, H, W] with explicit strides. NCHW and channels_last both let (h, w) flatten
into one index hw with a single stride, so every kernel sees a 2-D [M, C] view, M = N*H*W, of
rows r = n*HW + hw:  offset(r, c) = (r // HW) * stride_n + (r % HW) * stride_hw + c * stride_c.
Tensors whose (h, w) do not flatten are made contiguous first. Offsets are int64.

Statistics are fp32 whatever the input dtype. Reductions are deterministic and two-stage: stage 1
writes per-(row split, channel) partial sums to a [2, P, C] buffer, stage 2 adds them up in a
fixed order; no atomics. Variance uses sums shifted by K = x[0, c, 0, 0] (a sample of the same
channel, so |mean - K| is of the order of the standard deviation):
    S1 = sum(x - K),  S2 = sum((x - K)^2),  mean = K + S1/M,  M2 = S2 - S1^2/M = sum((x - mean)^2)
which avoids the cancellation of the plain sum(x^2) - M*mean^2. Running statistics follow
F.batch_norm: running = (1 - momentum) * running + momentum * batch, with the UNBIASED variance
M2 / (M - 1); normalisation uses the biased one, M2 / M.

Backward, with xhat = (x - mean) * rstd, scale = gamma * m, sums over the M rows of a channel, and
g = dy * (y > 0) with ReLU (y recomputed from x rather than saved), g = dy without:
    dbeta = sum(g)          dscale = sum(g * xhat)
    dgamma = dscale * m     dmask = dscale * gamma
    dx = scale * rstd * (g - sum(g)/M - xhat * sum(g * xhat)/M)    training (mean, var depend on x)
    dx = scale * rstd * g                                          eval (running stats are constants)

Tiles are [BLOCK_M rows, BLOCK_C channels]. The block shapes favour channels_last (channels
contiguous: wide, coalesced channel blocks), the layout the engine runs in; NCHW is supported and
tested but not tuned (r // HW hides the row contiguity from Triton's coalescing analysis).

Pipeline (one triton_op per step, so torch.compile sees every kernel):
    rnp_fast::masked_bn_stats    _fwd_partials -> _fwd_finalize   mean, rstd; running stats updated
    rnp_fast::masked_bn_apply    _fwd_apply                       y (differentiable)
    rnp_fast::masked_bn_backward _bwd_partials -> _bwd_finalize -> _bwd_dx
The stats op mutates the running statistics, and torch.library refuses autograd on mutating ops,
so it runs on x.detach(); the backward of the apply op gives the full gradient, including the
paths through mean(x) and var(x) in training mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_cols(tile, c_block, M, C, HW, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Image index n, spatial index hw (both [BLOCK_M] int64), channels [BLOCK_C], validity."""
    rows = tile.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = c_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    n = rows // HW
    hw = rows - n * HW
    valid = (rows < M)[:, None] & (cols < C)[None, :]
    return n, hw, cols, valid


@triton.jit
def _offsets(n, hw, cols, stride_n, stride_c, stride_hw):
    """[BLOCK_M, BLOCK_C] int64 element offsets of one tensor (each tensor has its own strides)."""
    return (n * stride_n + hw * stride_hw)[:, None] + (cols * stride_c)[None, :]


@triton.jit
def _channel_params(cols, mean_ptr, rstd_ptr, w_ptr, b_ptr, m_ptr, C):
    """Per-channel fp32 mean, rstd, scale = gamma * m and beta, each [BLOCK_C]."""
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    gamma = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return mean, rstd, gamma * m, beta


@triton.jit
def _upstream_grad(dy, xhat, scale, beta, RELU: tl.constexpr):
    """g = dy * (y > 0) with y recomputed from x (saves keeping y alive); g = dy without ReLU."""
    if RELU:
        y = xhat * scale[None, :] + beta[None, :]
        dy = tl.where(y > 0.0, dy, 0.0)
    return dy


@triton.jit
def _sum_partials(part_ptr, cols, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 2: (sum_p part[0, p, c], sum_p part[1, p, c]) in a fixed order -> deterministic."""
    s0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        offs = ps[:, None] * C + cols[None, :]
        valid = (ps < P)[:, None] & (cols < C)[None, :]
        s0 += tl.sum(tl.load(part_ptr + offs, mask=valid, other=0.0), axis=0)
        s1 += tl.sum(tl.load(part_ptr + P * C + offs, mask=valid, other=0.0), axis=0)
    return s0, s1


@triton.jit
def _fwd_partials_kernel(
    x_ptr,  # [N, C, H, W] fp32/bf16/fp16, strides (sx_n, sx_c, sx_hw)
    part_ptr,  # [2, P, C] fp32 out: S1 = sum(x - K), S2 = sum((x - K)^2) over the rows of split p
    M,
    C,
    HW,
    P,
    tiles_per_split,
    sx_n,
    sx_c,
    sx_hw,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    c_block = tl.program_id(1)
    cols = c_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    shift = tl.load(x_ptr + cols * sx_c, mask=cols < C, other=0.0).to(tl.float32)  # K = x[0,c,0,0]
    s1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        tile = split * tiles_per_split + t
        n, hw, tcols, valid = _rows_cols(tile, c_block, M, C, HW, BLOCK_M, BLOCK_C)
        offs = _offsets(n, hw, tcols, sx_n, sx_c, sx_hw)
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        d = tl.where(valid, x - shift[None, :], 0.0)
        s1 += tl.sum(d, axis=0)
        s2 += tl.sum(d * d, axis=0)
    out = part_ptr + split.to(tl.int64) * C + cols
    tl.store(out, s1, mask=cols < C)
    tl.store(out + P * C, s2, mask=cols < C)


@triton.jit
def _fwd_finalize_kernel(
    x_ptr,  # [N, C, H, W]: only x[0, c, 0, 0] is read (the shift K), channel stride sx_c
    part_ptr,  # [2, P, C] fp32 partial sums from _fwd_partials_kernel (unused in eval)
    mean_ptr,  # [C] fp32 out
    rstd_ptr,  # [C] fp32 out
    rmean_ptr,  # [C] running mean, any float dtype: read in eval, updated in training
    rvar_ptr,  # [C] running (unbiased) variance, same dtype as rmean
    M,
    C,
    P,
    sx_c,
    momentum,
    eps,
    TRAINING: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < C
    if TRAINING:
        s1, s2 = _sum_partials(part_ptr, cols, C, P, BLOCK_P, BLOCK_C)
        shift = tl.load(x_ptr + cols * sx_c, mask=cmask, other=0.0).to(tl.float32)
        d = s1 / M
        mean = shift + d
        m2 = tl.maximum(s2 - s1 * d, 0.0)  # sum((x - mean)^2), clamped against rounding
        var = m2 / M  # biased: used to normalise, as F.batch_norm does
        if UPDATE_RUNNING:
            # running <- (1 - momentum) * running + momentum * batch, variance unbiased (M - 1)
            rm = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            rv = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            rm = (1.0 - momentum) * rm + momentum * mean
            rv = (1.0 - momentum) * rv + momentum * (m2 / (M - 1))
            tl.store(rmean_ptr + cols, rm.to(rmean_ptr.dtype.element_ty), mask=cmask)
            tl.store(rvar_ptr + cols, rv.to(rvar_ptr.dtype.element_ty), mask=cmask)
    else:
        mean = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, 1.0 / tl.sqrt_rn(var + eps), mask=cmask)


@triton.jit
def _fwd_apply_kernel(
    x_ptr,  # [N, C, H, W] input, strides (sx_n, sx_c, sx_hw)
    y_ptr,  # [N, C, H, W] output, dtype of x, strides (sy_n, sy_c, sy_hw)
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] gamma
    b_ptr,  # [C] beta
    m_ptr,  # [C] neuron mask
    M,
    C,
    HW,
    sx_n,
    sx_c,
    sx_hw,
    sy_n,
    sy_c,
    sy_hw,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n, hw, cols, valid = _rows_cols(tl.program_id(0), tl.program_id(1), M, C, HW, BLOCK_M, BLOCK_C)
    mean, rstd, scale, beta = _channel_params(cols, mean_ptr, rstd_ptr, w_ptr, b_ptr, m_ptr, C)
    x = tl.load(x_ptr + _offsets(n, hw, cols, sx_n, sx_c, sx_hw), mask=valid, other=0.0)
    y = (x.to(tl.float32) - mean[None, :]) * (rstd * scale)[None, :] + beta[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + _offsets(n, hw, cols, sy_n, sy_c, sy_hw), y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_partials_kernel(
    dy_ptr,  # [N, C, H, W] upstream gradient, strides (sd_n, sd_c, sd_hw) (may differ from x's)
    x_ptr,  # [N, C, H, W] forward input, strides (sx_n, sx_c, sx_hw)
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] gamma
    b_ptr,  # [C] beta (only to recompute y for the ReLU)
    m_ptr,  # [C] neuron mask
    part_ptr,  # [2, P, C] fp32 out: sum(g), sum(g * xhat) over the rows of split p
    M,
    C,
    HW,
    P,
    tiles_per_split,
    sd_n,
    sd_c,
    sd_hw,
    sx_n,
    sx_c,
    sx_hw,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    c_block = tl.program_id(1)
    cols = c_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mean, rstd, scale, beta = _channel_params(cols, mean_ptr, rstd_ptr, w_ptr, b_ptr, m_ptr, C)
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        tile = split * tiles_per_split + t
        n, hw, tcols, valid = _rows_cols(tile, c_block, M, C, HW, BLOCK_M, BLOCK_C)
        x = tl.load(x_ptr + _offsets(n, hw, tcols, sx_n, sx_c, sx_hw), mask=valid, other=0.0)
        dy = tl.load(dy_ptr + _offsets(n, hw, tcols, sd_n, sd_c, sd_hw), mask=valid, other=0.0)
        xhat = (x.to(tl.float32) - mean[None, :]) * rstd[None, :]
        g = tl.where(valid, _upstream_grad(dy.to(tl.float32), xhat, scale, beta, RELU), 0.0)
        sg += tl.sum(g, axis=0)
        sgx += tl.sum(g * xhat, axis=0)
    out = part_ptr + split.to(tl.int64) * C + cols
    tl.store(out, sg, mask=cols < C)
    tl.store(out + P * C, sgx, mask=cols < C)


@triton.jit
def _bwd_finalize_kernel(
    part_ptr,  # [2, P, C] fp32 partial sums from _bwd_partials_kernel
    w_ptr,  # [C] gamma
    m_ptr,  # [C] neuron mask
    sums_ptr,  # [2, C] fp32 out: sum(g), sum(g * xhat) for _bwd_dx_kernel
    dw_ptr,  # [C] out, dtype of gamma: dgamma = dscale * m
    db_ptr,  # [C] out, dtype of beta: dbeta = sum(g)
    dm_ptr,  # [C] out, dtype of the mask: dmask = dscale * gamma
    C,
    P,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < C
    sg, dscale = _sum_partials(part_ptr, cols, C, P, BLOCK_P, BLOCK_C)  # dscale = sum(g * xhat)
    gamma = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(sums_ptr + cols, sg, mask=cmask)
    tl.store(sums_ptr + C + cols, dscale, mask=cmask)
    tl.store(db_ptr + cols, sg.to(db_ptr.dtype.element_ty), mask=cmask)
    tl.store(dw_ptr + cols, (dscale * m).to(dw_ptr.dtype.element_ty), mask=cmask)
    tl.store(dm_ptr + cols, (dscale * gamma).to(dm_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bwd_dx_kernel(
    dy_ptr,  # [N, C, H, W] upstream gradient, strides (sd_n, sd_c, sd_hw)
    x_ptr,  # [N, C, H, W] forward input, strides (sx_n, sx_c, sx_hw)
    dx_ptr,  # [N, C, H, W] out, dtype of x, strides (so_n, so_c, so_hw)
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
    w_ptr,  # [C] gamma
    b_ptr,  # [C] beta
    m_ptr,  # [C] neuron mask
    sums_ptr,  # [2, C] fp32: sum(g), sum(g * xhat) (read in training only)
    M,
    C,
    HW,
    sd_n,
    sd_c,
    sd_hw,
    sx_n,
    sx_c,
    sx_hw,
    so_n,
    so_c,
    so_hw,
    TRAINING: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n, hw, cols, valid = _rows_cols(tl.program_id(0), tl.program_id(1), M, C, HW, BLOCK_M, BLOCK_C)
    mean, rstd, scale, beta = _channel_params(cols, mean_ptr, rstd_ptr, w_ptr, b_ptr, m_ptr, C)
    x = tl.load(x_ptr + _offsets(n, hw, cols, sx_n, sx_c, sx_hw), mask=valid, other=0.0)
    dy = tl.load(dy_ptr + _offsets(n, hw, cols, sd_n, sd_c, sd_hw), mask=valid, other=0.0)
    xhat = (x.to(tl.float32) - mean[None, :]) * rstd[None, :]
    g = _upstream_grad(dy.to(tl.float32), xhat, scale, beta, RELU)
    k = (scale * rstd)[None, :]
    if TRAINING:
        # mean and var depend on x: dx = scale * rstd * (g - mean(g) - xhat * mean(g * xhat))
        cmask = cols < C
        mean_g = tl.load(sums_ptr + cols, mask=cmask, other=0.0) / M
        mean_gx = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0) / M
        dx = k * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    else:
        dx = k * g  # running statistics are constants: dx = scale * rstd * g
    tl.store(dx_ptr + _offsets(n, hw, cols, so_n, so_c, so_hw), dx.to(dx_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Host launch functions
# ----------------------------------------------------------------------------------------------

_TILE_ELEMS = 4096  # elements per [BLOCK_M, BLOCK_C] tile: 32 per thread with Triton's default 4 warps
_MAX_PROGRAMS = 1024  # stage-1 programs: enough to fill an H100 (132 SMs) several times over
_FINAL_BLOCK_C = 32  # channels per stage-2 program
_FINAL_BLOCK_P = 64  # partial rows summed per stage-2 step


@dataclass(frozen=True)
class _Plan:
    """Tiling of the [M, C] view; depends only on the shape and layout, so results are bitwise
    reproducible run to run (the reduction order never depends on timing)."""

    block_m: int
    block_c: int
    row_tiles: int  # cdiv(M, block_m)
    c_blocks: int  # cdiv(C, block_c)
    splits: int  # P: stage-1 programs per channel block, each summing tiles_per_split tiles
    tiles_per_split: int


def _plan(m: int, c: int, channels_fastest: bool) -> _Plan:
    # channels_last: channels are contiguous, so a wide channel block gives coalesced loads;
    # NCHW: rows (hw) are contiguous, so take few channels and many rows.
    block_c = min(triton.next_power_of_2(c), 64 if channels_fastest else 8)
    block_m = min(max(_TILE_ELEMS // block_c, 16), triton.next_power_of_2(m))
    row_tiles = triton.cdiv(m, block_m)
    c_blocks = triton.cdiv(c, block_c)
    splits = min(row_tiles, max(1, _MAX_PROGRAMS // c_blocks))
    tiles_per_split = triton.cdiv(row_tiles, splits)
    splits = triton.cdiv(row_tiles, tiles_per_split)
    return _Plan(block_m, block_c, row_tiles, c_blocks, splits, tiles_per_split)


def _flat_hw(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(t or a contiguous copy, (stride_n, stride_c, stride_hw)) such that element (n, c, h, w)
    sits at n*stride_n + c*stride_c + (h*W + w)*stride_hw."""
    _, _, h, w = t.shape
    stride_n, stride_c, stride_h, stride_w = t.stride()
    if w == 1:
        return t, (stride_n, stride_c, stride_h)
    if h == 1 or stride_h == w * stride_w:
        return t, (stride_n, stride_c, stride_w)
    return _flat_hw(t.contiguous())


def _stride_args(prefix: str, strides: tuple[int, int, int]) -> dict[str, int]:
    """Kernel keyword arguments {prefix_n, prefix_c, prefix_hw} for one tensor."""
    return dict(zip((f"{prefix}_n", f"{prefix}_c", f"{prefix}_hw"), strides, strict=True))


def _shape_args(x: Tensor, plan: _Plan) -> dict[str, int]:
    """Sizes and tile shape shared by the [M, C] kernels."""
    n, c, h, w = x.shape
    return {"M": n * h * w, "C": c, "HW": h * w, "BLOCK_M": plan.block_m, "BLOCK_C": plan.block_c}


def _launch_stats(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """fp32 (mean, rstd) per channel: batch statistics in training (updating the running ones
    when given), running statistics in eval."""
    n, c, h, w = x.shape
    x, sx = _flat_hw(x)
    plan = _plan(n * h * w, c, channels_fastest=sx[1] == 1)
    mean = x.new_empty(c, dtype=torch.float32)
    rstd = x.new_empty(c, dtype=torch.float32)
    part = x.new_empty((2, plan.splits, c), dtype=torch.float32) if training else mean
    if training:
        wrap_triton(_fwd_partials_kernel)[(plan.splits, plan.c_blocks)](
            x_ptr=x,
            part_ptr=part,
            P=plan.splits,
            tiles_per_split=plan.tiles_per_split,
            **_stride_args("sx", sx),
            **_shape_args(x, plan),
        )
    update = running_mean is not None
    wrap_triton(_fwd_finalize_kernel)[(triton.cdiv(c, _FINAL_BLOCK_C),)](
        x_ptr=x,
        part_ptr=part,
        mean_ptr=mean,
        rstd_ptr=rstd,
        rmean_ptr=running_mean if update else mean,  # dummy pointers: nothing to read or update
        rvar_ptr=running_var if update else rstd,
        M=n * h * w,
        C=c,
        P=plan.splits,
        sx_c=sx[1],
        momentum=momentum,
        eps=eps,
        TRAINING=training,
        UPDATE_RUNNING=update,
        BLOCK_P=_FINAL_BLOCK_P,
        BLOCK_C=_FINAL_BLOCK_C,
    )
    return mean, rstd


def _launch_apply(
    x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, bias: Tensor, mask: Tensor, relu: bool
) -> Tensor:
    """y = (x - mean) * rstd * (weight * mask) + bias, then ReLU if asked; y has x's layout."""
    n, c, h, w = x.shape
    x, sx = _flat_hw(x)
    y = torch.empty_like(x)
    plan = _plan(n * h * w, c, channels_fastest=sx[1] == 1)
    wrap_triton(_fwd_apply_kernel)[(plan.row_tiles, plan.c_blocks)](
        x_ptr=x,
        y_ptr=y,
        mean_ptr=mean,
        rstd_ptr=rstd,
        w_ptr=weight,
        b_ptr=bias,
        m_ptr=mask,
        **_stride_args("sx", sx),
        **_stride_args("sy", _flat_hw(y)[1]),
        **_shape_args(x, plan),
        RELU=relu,
    )
    return y


def _launch_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    training: bool,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dmask); see _bwd_dx_kernel and _bwd_finalize_kernel for the math."""
    n, c, h, w = x.shape
    x, sx = _flat_hw(x)
    dy, sd = _flat_hw(dy)  # autograd may hand over another layout, or zero strides (expand)
    dx = torch.empty_like(x)
    plan = _plan(n * h * w, c, channels_fastest=sx[1] == 1)
    part = x.new_empty((2, plan.splits, c), dtype=torch.float32)
    sums = x.new_empty((2, c), dtype=torch.float32)
    dweight, dbias, dmask = torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(mask)
    params = {"mean_ptr": mean, "rstd_ptr": rstd, "w_ptr": weight, "b_ptr": bias, "m_ptr": mask}
    wrap_triton(_bwd_partials_kernel)[(plan.splits, plan.c_blocks)](
        dy_ptr=dy,
        x_ptr=x,
        part_ptr=part,
        P=plan.splits,
        tiles_per_split=plan.tiles_per_split,
        **params,
        **_stride_args("sd", sd),
        **_stride_args("sx", sx),
        **_shape_args(x, plan),
        RELU=relu,
    )
    wrap_triton(_bwd_finalize_kernel)[(triton.cdiv(c, _FINAL_BLOCK_C),)](
        part_ptr=part,
        w_ptr=weight,
        m_ptr=mask,
        sums_ptr=sums,
        dw_ptr=dweight,
        db_ptr=dbias,
        dm_ptr=dmask,
        C=c,
        P=plan.splits,
        BLOCK_P=_FINAL_BLOCK_P,
        BLOCK_C=_FINAL_BLOCK_C,
    )
    wrap_triton(_bwd_dx_kernel)[(plan.row_tiles, plan.c_blocks)](
        dy_ptr=dy,
        x_ptr=x,
        dx_ptr=dx,
        sums_ptr=sums,
        **params,
        **_stride_args("sd", sd),
        **_stride_args("sx", sx),
        **_stride_args("so", _flat_hw(dx)[1]),
        **_shape_args(x, plan),
        TRAINING=training,
        RELU=relu,
    )
    return dx, dweight, dbias, dmask


# ----------------------------------------------------------------------------------------------
# torch.library ops: traceable by torch.compile (fullgraph) on CUDA
# ----------------------------------------------------------------------------------------------


@triton_op("rnp_fast::masked_bn_stats", mutates_args={"running_mean", "running_var"})
def _stats_op(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    return _launch_stats(x, running_mean, running_var, training, momentum, eps)


@triton_op("rnp_fast::masked_bn_apply", mutates_args=())
def _apply_op(
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    training: bool,
    relu: bool,
) -> Tensor:
    return _launch_apply(x, mean, rstd, weight, bias, mask, relu)


@triton_op("rnp_fast::masked_bn_backward", mutates_args=())
def _backward_op(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    training: bool,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _launch_backward(dy, x, mean, rstd, weight, bias, mask, training, relu)


# Fake (meta) kernels: shapes, dtypes and strides only, so tracing never launches a kernel.
@_stats_op.register_fake
def _stats_fake(x, running_mean, running_var, training, momentum, eps):
    c = x.shape[1]
    return x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


@_apply_op.register_fake
def _apply_fake(x, mean, rstd, weight, bias, mask, training, relu):
    return torch.empty_like(_flat_hw(x)[0])


@_backward_op.register_fake
def _backward_fake(dy, x, mean, rstd, weight, bias, mask, training, relu):
    dx = torch.empty_like(_flat_hw(x)[0])
    return dx, torch.empty_like(weight), torch.empty_like(bias), torch.empty_like(mask)


def _apply_setup_context(ctx, inputs, output):
    x, mean, rstd, weight, bias, mask, training, relu = inputs
    ctx.save_for_backward(x, mean, rstd, weight, bias, mask)
    ctx.training, ctx.relu = training, relu


def _apply_backward(ctx, dy):
    # mean and rstd come from x.detach(); their dependence on x is inside dx (training mode).
    x, mean, rstd, weight, bias, mask = ctx.saved_tensors
    dx, dweight, dbias, dmask = torch.ops.rnp_fast.masked_bn_backward(
        dy, x, mean, rstd, weight, bias, mask, ctx.training, ctx.relu
    )
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        None,
        None,
        dweight if need[3] else None,
        dbias if need[4] else None,
        dmask if need[5] else None,
        None,
        None,
    )


_apply_op.register_autograd(_apply_backward, setup_context=_apply_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by triton.jit at import, too
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_vector(name: str, t: Tensor, x: Tensor) -> None:
    """A per-channel vector: 1-D of length C, on x's device, fp32 or x's dtype."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must have shape [C] = [{x.shape[1]}], got {list(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.dtype not in (torch.float32, x.dtype):
        raise TypeError(f"{name} has dtype {t.dtype}; expected torch.float32 or x's dtype {x.dtype}")


def _check_same_dtype(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        found = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors, strict=True))
        raise TypeError(f"{', '.join(names)} must share one dtype, got {found}")


def _check_x(x: Tensor, training: bool) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {list(x.shape)}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported: float32, bfloat16, float16")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {list(x.shape)}")
    if x.device.type == "cpu" and not _INTERPRET:
        raise ValueError("x is on the CPU: the kernels need a GPU, or TRITON_INTERPRET=1 set before import")
    if training and x.shape[0] * x.shape[2] * x.shape[3] < 2:
        raise ValueError(f"x: training needs more than 1 value per channel, got shape {list(x.shape)}")


def _check_inputs(x, weight, bias, mask, running_mean, running_var, training, momentum, eps) -> None:
    _check_x(x, training)
    for name, t in (("weight", weight), ("bias", bias), ("mask", mask)):
        _check_vector(name, t, x)
    _check_same_dtype(("weight", "bias", "mask"), (weight, bias, mask))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be both given or both None")
    if running_mean is None and not training:
        raise ValueError("running_mean and running_var are required in eval mode (training=False)")
    if running_mean is not None:
        _check_vector("running_mean", running_mean, x)
        _check_vector("running_var", running_var, x)
        _check_same_dtype(("running_mean", "running_var"), (running_mean, running_var))
    _check_scalars(momentum, eps)


def _check_scalars(momentum: float, eps: float) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {momentum!r} (None, a cumulative average, is unsupported)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {eps!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")


def masked_batch_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool = False,
) -> Tensor:
    """Masked BatchNorm2d (+ ReLU) with Triton kernels; same contract as F.batch_norm with weight
    ``weight * mask``. Training uses batch statistics and updates ``running_mean`` and
    ``running_var`` in place (unbiased variance) when given; eval uses the running statistics.
    Differentiable in x, weight, bias and mask."""
    _check_inputs(x, weight, bias, mask, running_mean, running_var, training, momentum, eps)
    mean, rstd = torch.ops.rnp_fast.masked_bn_stats(
        x.detach(), running_mean, running_var, bool(training), float(momentum), float(eps)
    )
    return torch.ops.rnp_fast.masked_bn_apply(x, mean, rstd, weight, bias, mask, bool(training), bool(relu))
