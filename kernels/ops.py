"""The fused masked BatchNorm as one functional custom operator, and its functional API.

    y = (x - mean) * rstd * (weight * mask) + bias,   rstd = 1 / sqrt(var + eps)   (bias not masked)

    rnp_fast::masked_bn(x, weight, bias, mask, running_mean?, running_var?, training, eps)
        -> (y, mean, rstd, var_unbiased)
    rnp_fast::masked_bn_backward(dy, x, mean, rstd, weight, mask, training)
        -> (dx, dweight, dbias, dmask)

One operator, two implementations: plain PyTorch (the default, so the CPU, and a compiled step
that calls the operator, work and are testable anywhere) and the Triton kernels of
``kernels/masked_bn.py`` on CUDA, imported on the first CUDA call (this module imports without
Triton). Fake implementations give torch.compile shapes, dtypes and strides without running
anything; the autograd formula calls the backward operator, so the forward graph holds one opaque
node and the backward graph another.

The operator mutates nothing: torch.library cannot register autograd for an operator that mutates
its inputs, and a functional node is one that torch.compile may freely move. ``masked_batch_norm``
updates the running statistics itself, in Python, from the operator's mean and var_unbiased
outputs; Dynamo traces that update into the same graph.

Statistics are fp32 whatever the input dtype (fp64 for fp64 inputs, which only the PyTorch
implementation takes: they serve gradcheck). y and dx have x's dtype and the layout
``output_memory_format(x)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

_DIMS = (0, 2, 3)  # every axis but the channels: the statistics are per channel


def output_memory_format(x: Tensor) -> torch.memory_format:
    """y and dx are channels_last when x is (and not also contiguous), contiguous otherwise: one
    rule for every implementation, so the fake tensors' strides are the real ones."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_channel(v: Tensor) -> Tensor:
    return v[None, :, None, None]


def _rows(x: Tensor) -> int:
    """M = N*H*W: values per channel."""
    return x.numel() // x.shape[1]


# ----------------------------------------------------------------------------------------------
# Forward operator
# ----------------------------------------------------------------------------------------------


_FORWARD_SCHEMA = (
    "(Tensor x, Tensor weight, Tensor bias, Tensor mask, Tensor? running_mean, Tensor? running_var, bool training,"
    " float eps) -> (Tensor y, Tensor mean, Tensor rstd, Tensor var_unbiased)"
)


@torch.library.custom_op("rnp_fast::masked_bn", mutates_args=(), schema=_FORWARD_SCHEMA)
def masked_bn_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mask: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch implementation: the CPU's, and any device's without a kernel of its own."""
    xs = x.to(_stat_dtype(x))
    if training:
        var, mean = torch.var_mean(xs, dim=_DIMS, correction=0)
        var_unbiased = var * (_rows(x) / (_rows(x) - 1))
    else:
        # copies: an operator's outputs must not alias its inputs
        mean = running_mean.to(xs.dtype, copy=True)
        var = var_unbiased = running_var.to(xs.dtype, copy=True)
    rstd = torch.rsqrt(var + eps)
    scale = rstd * weight.to(xs.dtype) * mask.to(xs.dtype)
    y = (xs - _per_channel(mean)) * _per_channel(scale) + _per_channel(bias.to(xs.dtype))
    return y.to(x.dtype, memory_format=output_memory_format(x)), mean, rstd, var_unbiased


@masked_bn_op.register_kernel("cuda")
def _masked_bn_cuda(x, weight, bias, mask, running_mean, running_var, training, eps):
    from . import masked_bn as triton_impl  # needs Triton: imported on the first CUDA call only

    return triton_impl.masked_bn_forward(x, weight, bias, mask, running_mean, running_var, training, eps)


@masked_bn_op.register_fake
def _masked_bn_fake(x, weight, bias, mask, running_mean, running_var, training, eps):
    y = torch.empty_like(x, memory_format=output_memory_format(x))
    mean, rstd, var = (x.new_empty(x.shape[1], dtype=_stat_dtype(x)) for _ in range(3))
    return y, mean, rstd, var


# ----------------------------------------------------------------------------------------------
# Backward operator
# ----------------------------------------------------------------------------------------------


_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor mean, Tensor rstd, Tensor weight, Tensor mask, bool training)"
    " -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dmask)"
)


@torch.library.custom_op("rnp_fast::masked_bn_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def masked_bn_backward_op(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor, mask: Tensor, training: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """PyTorch implementation. With xhat = (x - mean) * rstd, scale = weight * mask, sums per channel:
    dbias = sum(dy), dscale = sum(dy * xhat), dweight = dscale * mask, dmask = dscale * weight,
    dx = scale * rstd * (dy - sum(dy)/M - xhat * dscale/M) in training, scale * rstd * dy in eval."""
    g = dy.to(mean.dtype)
    xhat = (x.to(mean.dtype) - _per_channel(mean)) * _per_channel(rstd)
    sum_g, dscale = g.sum(_DIMS), (g * xhat).sum(_DIMS)
    w, m = weight.to(mean.dtype), mask.to(mean.dtype)
    if training:  # mean and var are functions of x: their paths add the two mean terms
        g = g - _per_channel(sum_g / _rows(x)) - xhat * _per_channel(dscale / _rows(x))
    dx = _per_channel(w * m * rstd) * g
    dx = dx.to(x.dtype, memory_format=output_memory_format(x))
    return dx, (dscale * m).to(weight.dtype), sum_g.to(weight.dtype), (dscale * w).to(mask.dtype)


@masked_bn_backward_op.register_kernel("cuda")
def _masked_bn_backward_cuda(dy, x, mean, rstd, weight, mask, training):
    from . import masked_bn as triton_impl

    return triton_impl.masked_bn_backward(dy, x, mean, rstd, weight, mask, training)


@masked_bn_backward_op.register_fake
def _masked_bn_backward_fake(dy, x, mean, rstd, weight, mask, training):
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    return dx, torch.empty_like(weight), torch.empty_like(weight), torch.empty_like(mask)


# ----------------------------------------------------------------------------------------------
# Autograd: y is differentiable in x, weight, bias and mask; the statistics are not
# ----------------------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, mask, _, _, training, _ = inputs
    _, mean, rstd, var_unbiased = output
    ctx.mark_non_differentiable(mean, rstd, var_unbiased)
    ctx.save_for_backward(x, mean, rstd, weight, mask)
    ctx.training = training


def _backward(ctx, dy, _dmean, _drstd, _dvar):
    need = ctx.needs_input_grad[:4]  # x, weight, bias, mask
    if not any(need):
        return (None,) * 8
    x, mean, rstd, weight, mask = ctx.saved_tensors
    grads = torch.ops.rnp_fast.masked_bn_backward(dy, x, mean, rstd, weight, mask, ctx.training)
    # autograd casts dbias to the bias's dtype should it differ from weight's
    return (*(grad if wanted else None for grad, wanted in zip(grads, need, strict=True)), None, None, None, None)


masked_bn_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------

_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take


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
    if x.dtype not in (_CUDA_DTYPES if x.is_cuda else _INPUT_DTYPES):
        raise TypeError(f"x has dtype {x.dtype}; supported: float32, bfloat16, float16 (and float64 off CUDA)")
    if x.numel() == 0:
        raise ValueError(f"x must not be empty, got shape {list(x.shape)}")
    if training and _rows(x) < 2:
        raise ValueError(f"x: training needs more than 1 value per channel, got shape {list(x.shape)}")


def _check_scalars(momentum: float, eps: float) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {momentum!r} (None, a cumulative average, is unsupported)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {eps!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _check_inputs(x, weight, bias, mask, running_mean, running_var, training, momentum, eps) -> None:
    """Plain Python checks of shapes, dtypes and devices: Dynamo evaluates them while tracing,
    so they cost nothing in a compiled step and break no graph."""
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


def _update_running_(running: Tensor, batch: Tensor, momentum: float) -> None:
    # F.batch_norm's rule: running = (1 - momentum) * running + momentum * batch, in the
    # statistics' precision, rounded once into the buffer's dtype
    running.copy_(running.to(batch.dtype) * (1.0 - momentum) + batch * momentum)


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
) -> Tensor:
    """Masked BatchNorm2d: F.batch_norm with weight ``weight * mask``, as one fused operator.

    Training normalises with the batch statistics and, when running statistics are given,
    updates them in place (the variance unbiased); eval uses the running statistics.
    Differentiable in x, weight, bias and mask."""
    _check_inputs(x, weight, bias, mask, running_mean, running_var, training, momentum, eps)
    training = bool(training)
    stats = (None, None) if training else (running_mean, running_var)  # training never reads them
    y, mean, _, var_unbiased = torch.ops.rnp_fast.masked_bn(x, weight, bias, mask, *stats, training, float(eps))
    if training and running_mean is not None:
        with torch.no_grad():
            _update_running_(running_mean, mean, float(momentum))
            _update_running_(running_var, var_unbiased, float(momentum))
    return y
