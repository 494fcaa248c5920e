"""Fused masked BatchNorm2d in Triton: the CUDA implementation of ``rnp_fast::masked_bn``.

    y = (x - mean) * rstd * (gamma * m) + beta,   rstd = 1 / sqrt(var + eps)   (bias not masked)

This module holds the kernels and two plain launchers, ``masked_bn_forward`` and
``masked_bn_backward``; the operator itself (schema, fake and autograd registrations, the PyTorch
implementation used on the CPU, the running-statistics update) lives in ``kernels/ops.py``, which
imports this module on its first CUDA call. The launchers mutate nothing: the forward returns
(y, mean, rstd, var_unbiased) and the caller updates the running statistics from them.

Layout. x is [N, C, H, W] with explicit strides. NCHW and channels_last both let (h, w) flatten
into one index hw with a single stride, so every kernel sees a 2-D [M, C] view, M = N*H*W, of
rows r = n*HW + hw:  offset(r, c) = (r // HW) * stride_n + (r % HW) * stride_hw + c * stride_c.
Tensors whose (h, w) do not flatten are made contiguous first. Offsets are int64. y and dx are
allocated in ``ops.output_memory_format(x)`` (channels_last or contiguous), as the fake kernels say.

Statistics are fp32 whatever the input dtype (fp32, bf16 or fp16). Reductions are deterministic
and two-stage: stage 1 (P row splits x the channel blocks, P sized to a few waves of the device's
SMs) writes per-(split, channel) partial sums to a [2, P, C] buffer; stage 2 adds the P rows up in
a fixed order, [BLOCK_P, BLOCK_C] tiles at a time; no atomics. Variance uses sums shifted by
K = x[0, c, 0, 0] (a sample of the same channel, so |mean - K| is of the order of the std):
    S1 = sum(x - K),  S2 = sum((x - K)^2),  mean = K + S1/M,  M2 = S2 - S1^2/M = sum((x - mean)^2)
which avoids the cancellation of the plain sum(x^2) - M*mean^2. Training normalises with the
biased variance M2 / M and also returns the unbiased M2 / (M - 1) for the running variance (as
F.batch_norm uses it); eval normalises with the running statistics, returned as mean and var.

Backward, with xhat = (x - mean) * rstd, scale = gamma * m, g = dy, sums over the M rows of a channel:
    dbeta = sum(g)          dscale = sum(g * xhat)
    dgamma = dscale * m     dmask = dscale * gamma
    dx = scale * rstd * (g - sum(g)/M - xhat * sum(g * xhat)/M)    training (mean, var depend on x)
    dx = scale * rstd * g                                          eval (running stats are constants)

Tiles are [BLOCK_M rows, BLOCK_C channels]. The block shapes favour channels_last (channels
contiguous: wide, coalesced channel blocks), the layout the engine runs in; NCHW is supported and
tested but not tuned (r // HW hides the row contiguity from Triton's coalescing analysis).

Kernels per call:
    forward   _fwd_partials (training only) -> _fwd_finalize -> _fwd_apply
    backward  _bwd_partials -> _bwd_finalize -> _bwd_dx
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ops import output_memory_format

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
def _channel_scale(cols, mean_ptr, rstd_ptr, w_ptr, m_ptr, C):
    """Per-channel fp32 mean, rstd and scale = gamma * m, each [BLOCK_C]."""
    cmask = cols < C
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cmask, other=0.0)
    gamma = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    return mean, rstd, gamma * m


@triton.jit
def _sum_partials(part_ptr, cols, C, P, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Stage 2: (sum_p part[0, p, c], sum_p part[1, p, c]), BLOCK_P rows per step in a fixed
    order, so the result is bitwise reproducible."""
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
    part_ptr,  # [2, P, C] fp32 partial sums from _fwd_partials_kernel (training only)
    rmean_ptr,  # [C] running mean, any float dtype (eval only)
    rvar_ptr,  # [C] running (unbiased) variance, same dtype as rmean (eval only)
    mean_ptr,  # [C] fp32 out
    rstd_ptr,  # [C] fp32 out
    var_ptr,  # [C] fp32 out: unbiased batch variance M2 / (M - 1) (training), running var (eval)
    M,
    C,
    P,
    sx_c,
    eps,
    TRAINING: tl.constexpr,
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
        var_out = m2 / (M - 1)  # unbiased: what F.batch_norm mixes into the running variance
    else:
        mean = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        var = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        var_out = var
    tl.store(mean_ptr + cols, mean, mask=cmask)
    tl.store(rstd_ptr + cols, 1.0 / tl.sqrt_rn(var + eps), mask=cmask)
    tl.store(var_ptr + cols, var_out, mask=cmask)


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
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n, hw, cols, valid = _rows_cols(tl.program_id(0), tl.program_id(1), M, C, HW, BLOCK_M, BLOCK_C)
    mean, rstd, scale = _channel_scale(cols, mean_ptr, rstd_ptr, w_ptr, m_ptr, C)
    beta = tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + _offsets(n, hw, cols, sx_n, sx_c, sx_hw), mask=valid, other=0.0)
    y = (x.to(tl.float32) - mean[None, :]) * (rstd * scale)[None, :] + beta[None, :]
    tl.store(y_ptr + _offsets(n, hw, cols, sy_n, sy_c, sy_hw), y.to(y_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _bwd_partials_kernel(
    dy_ptr,  # [N, C, H, W] upstream gradient, strides (sd_n, sd_c, sd_hw) (may differ from x's)
    x_ptr,  # [N, C, H, W] forward input, strides (sx_n, sx_c, sx_hw)
    mean_ptr,  # [C] fp32
    rstd_ptr,  # [C] fp32
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
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    split = tl.program_id(0)
    c_block = tl.program_id(1)
    cols = c_block.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    mean = tl.load(mean_ptr + cols, mask=cols < C, other=0.0)
    rstd = tl.load(rstd_ptr + cols, mask=cols < C, other=0.0)
    sg = tl.zeros([BLOCK_C], dtype=tl.float32)
    sgx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t in range(0, tiles_per_split):
        tile = split * tiles_per_split + t
        n, hw, tcols, valid = _rows_cols(tile, c_block, M, C, HW, BLOCK_M, BLOCK_C)
        x = tl.load(x_ptr + _offsets(n, hw, tcols, sx_n, sx_c, sx_hw), mask=valid, other=0.0)
        dy = tl.load(dy_ptr + _offsets(n, hw, tcols, sd_n, sd_c, sd_hw), mask=valid, other=0.0)
        xhat = (x.to(tl.float32) - mean[None, :]) * rstd[None, :]
        g = dy.to(tl.float32)  # 0 outside the tensor (masked load), so no tl.where is needed
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
    db_ptr,  # [C] out, dtype of gamma (beta shares it): dbeta = sum(g)
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
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n, hw, cols, valid = _rows_cols(tl.program_id(0), tl.program_id(1), M, C, HW, BLOCK_M, BLOCK_C)
    mean, rstd, scale = _channel_scale(cols, mean_ptr, rstd_ptr, w_ptr, m_ptr, C)
    dy = tl.load(dy_ptr + _offsets(n, hw, cols, sd_n, sd_c, sd_hw), mask=valid, other=0.0)
    g = dy.to(tl.float32)
    k = (scale * rstd)[None, :]
    if TRAINING:
        # mean and var depend on x: dx = scale * rstd * (g - mean(g) - xhat * mean(g * xhat))
        x = tl.load(x_ptr + _offsets(n, hw, cols, sx_n, sx_c, sx_hw), mask=valid, other=0.0)
        xhat = (x.to(tl.float32) - mean[None, :]) * rstd[None, :]
        cmask = cols < C
        mean_g = tl.load(sums_ptr + cols, mask=cmask, other=0.0) / M
        mean_gx = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0) / M
        dx = k * (g - mean_g[None, :] - xhat * mean_gx[None, :])
    else:
        dx = k * g  # running statistics are constants: dx = scale * rstd * g (x is not read)
    tl.store(dx_ptr + _offsets(n, hw, cols, so_n, so_c, so_hw), dx.to(dx_ptr.dtype.element_ty), mask=valid)


# ----------------------------------------------------------------------------------------------
# Launch plan
# ----------------------------------------------------------------------------------------------

_TILE_ELEMS = 4096  # elements per [BLOCK_M, BLOCK_C] tile of the [M, C] kernels
_WAVES = 4  # stage-1 programs per SM: enough loads in flight to keep HBM busy, few partial rows
_DEFAULT_SPLITS = 4  # P per channel block off CUDA (the interpreter runs each program in Python)
_FINAL_TILE_ELEMS = 8192  # elements per [BLOCK_P, BLOCK_C] stage-2 step
_FINAL_BLOCK_C = 32  # channels per stage-2 program: 128-byte rows of the fp32 [2, P, C] buffer


@dataclass(frozen=True)
class _Plan:
    """Tiling of the [M, C] view. It depends only on the shape, layout and device model, so the
    reduction order, hence every bit of the result, is the same run to run."""

    block_m: int
    block_c: int
    row_tiles: int  # cdiv(M, block_m)
    c_blocks: int  # cdiv(C, block_c)
    splits: int  # P: stage-1 programs per channel block, each summing tiles_per_split tiles
    tiles_per_split: int
    num_warps: int  # of the [M, C] kernels
    final_block_p: int  # stage 2: partial rows per step
    final_block_c: int  # stage 2: channels per program
    final_warps: int


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _max_splits(device: torch.device, c_blocks: int) -> int:
    """Stage-1 row splits per channel block: a few waves of the device's SMs in all. More would
    only lengthen stage 2 (which reads P rows per channel); fewer would leave SMs idle."""
    if device.type != "cuda":
        return _DEFAULT_SPLITS
    return max(1, _WAVES * _sm_count(device.index) // c_blocks)


def _warps(tile_elems: int) -> int:
    # 8 warps keep 16 elements per thread on full tiles; small tiles (tiny M) need no more than 4
    return 8 if tile_elems >= 4096 else 4


def _plan(m: int, c: int, channels_fastest: bool, device: torch.device) -> _Plan:
    # channels_last: channels are contiguous, so a wide channel block gives coalesced loads;
    # NCHW: rows (hw) are contiguous, so take few channels and many rows.
    block_c = min(triton.next_power_of_2(c), 64 if channels_fastest else 8)
    block_m = min(max(_TILE_ELEMS // block_c, 16), triton.next_power_of_2(m))
    row_tiles = triton.cdiv(m, block_m)
    c_blocks = triton.cdiv(c, block_c)
    splits = min(row_tiles, _max_splits(device, c_blocks))
    tiles_per_split = triton.cdiv(row_tiles, splits)
    splits = triton.cdiv(row_tiles, tiles_per_split)  # no split left without a tile
    final_block_c = min(triton.next_power_of_2(c), _FINAL_BLOCK_C)
    final_block_p = min(triton.next_power_of_2(splits), max(_FINAL_TILE_ELEMS // final_block_c, 1))
    return _Plan(
        block_m,
        block_c,
        row_tiles,
        c_blocks,
        splits,
        tiles_per_split,
        num_warps=_warps(block_m * block_c),
        final_block_p=final_block_p,
        final_block_c=final_block_c,
        final_warps=_warps(final_block_p * final_block_c),
    )


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
    """Sizes, tile shape and warps shared by the [M, C] kernels."""
    n, c, h, w = x.shape
    return {
        "M": n * h * w,
        "C": c,
        "HW": h * w,
        "BLOCK_M": plan.block_m,
        "BLOCK_C": plan.block_c,
        "num_warps": plan.num_warps,
    }


def _final_args(plan: _Plan) -> dict[str, int]:
    return {
        "P": plan.splits,
        "BLOCK_P": plan.final_block_p,
        "BLOCK_C": plan.final_block_c,
        "num_warps": plan.final_warps,
    }


def _final_grid(c: int, plan: _Plan) -> tuple[int]:
    return (triton.cdiv(c, plan.final_block_c),)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_kernel_dtype(x: Tensor) -> None:
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the Triton masked BatchNorm takes float32, bfloat16 or float16 inputs, got {x.dtype}")


# ----------------------------------------------------------------------------------------------
# Launchers (called by ops.py's CUDA implementation; they run on CPU tensors with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------


def _forward_stats(
    x: Tensor,
    sx: tuple[int, int, int],
    plan: _Plan,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """fp32 (mean, rstd, var_unbiased): batch statistics in training, the running ones in eval."""
    n, c, h, w = x.shape
    mean, rstd, var = (x.new_empty(c, dtype=torch.float32) for _ in range(3))
    part = mean  # dummy pointer in eval: stage 1 does not run, the finalize does not read it
    if training:
        part = x.new_empty((2, plan.splits, c), dtype=torch.float32)
        _fwd_partials_kernel[(plan.splits, plan.c_blocks)](
            x,
            part,
            tiles_per_split=plan.tiles_per_split,
            P=plan.splits,
            **_stride_args("sx", sx),
            **_shape_args(x, plan),
        )
    _fwd_finalize_kernel[_final_grid(c, plan)](
        x,
        part,
        running_mean if not training else mean,  # dummy pointers in training: not read
        running_var if not training else var,
        mean,
        rstd,
        var,
        M=n * h * w,
        C=c,
        sx_c=sx[1],
        eps=eps,
        TRAINING=training,
        **_final_args(plan),
    )
    return mean, rstd, var


def masked_bn_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, var_unbiased), statistics fp32 [C]. Training: batch statistics (running
    ones ignored); eval: running_mean/running_var (required), returned as mean and var."""
    _check_kernel_dtype(x)
    if not training and running_mean is None:
        raise ValueError("eval mode needs running_mean and running_var")
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    x, sx = _flat_hw(x)
    plan = _plan(n * h * w, c, channels_fastest=sx[1] == 1, device=x.device)
    mean, rstd, var = _forward_stats(x, sx, plan, running_mean, running_var, training, eps)
    _fwd_apply_kernel[(plan.row_tiles, plan.c_blocks)](
        x,
        y,
        mean,
        rstd,
        weight,
        bias,
        mask,
        **_stride_args("sx", sx),
        **_stride_args("sy", _flat_hw(y)[1]),
        **_shape_args(x, plan),
    )
    return y, mean, rstd, var


def masked_bn_backward(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, mask: Tensor, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dmask); dx in x's dtype, dbias in weight's (the bias shares it)."""
    _check_kernel_dtype(x)
    n, c, h, w = x.shape
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    x, sx = _flat_hw(x)
    dy, sd = _flat_hw(dy)  # autograd may hand over another layout, or zero strides (expand)
    plan = _plan(n * h * w, c, channels_fastest=sx[1] == 1, device=x.device)
    part = x.new_empty((2, plan.splits, c), dtype=torch.float32)
    sums = x.new_empty((2, c), dtype=torch.float32)
    dweight, dbias, dmask = torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(mask)
    _bwd_partials_kernel[(plan.splits, plan.c_blocks)](
        dy,
        x,
        mean,
        rstd,
        part,
        P=plan.splits,
        tiles_per_split=plan.tiles_per_split,
        **_stride_args("sd", sd),
        **_stride_args("sx", sx),
        **_shape_args(x, plan),
    )
    _bwd_finalize_kernel[_final_grid(c, plan)](
        part, weight, mask, sums, dweight, dbias, dmask, C=c, **_final_args(plan)
    )
    _bwd_dx_kernel[(plan.row_tiles, plan.c_blocks)](
        dy,
        x,
        dx,
        mean,
        rstd,
        weight,
        mask,
        sums,
        **_stride_args("sd", sd),
        **_stride_args("sx", sx),
        **_stride_args("so", _flat_hw(dx)[1]),
        **_shape_args(x, plan),
        TRAINING=training,
    )
    return dx, dweight, dbias, dmask
