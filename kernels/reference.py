"""Pure-PyTorch reference for the masked BatchNorm operator, shared by tests and benchmarks.

    y = F.batch_norm(x, running_mean, running_var, weight * mask, bias, training, momentum, eps)

This is exactly what ``rnp_fast.masked_batchnorm.MaskedBatchNorm2d`` computes without the fused
operator, so it is also the eager baseline the benchmarks time.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def masked_batch_norm_reference(
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
    """Same signature and semantics as ``rnp_fast.kernels.ops.masked_batch_norm``."""
    return F.batch_norm(x, running_mean, running_var, weight * mask, bias, training, momentum, eps)
