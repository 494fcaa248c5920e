"""Masked BatchNorm: BatchNorm2d whose affine weight is multiplied by a learnable per-channel mask.

    y = (x - mean) / sqrt(var + eps) * (gamma * m) + beta        (the bias is not masked)

It subclasses ``nn.BatchNorm2d`` so state dicts keep BatchNorm's layout plus ``neuron_mask``, and
eval mode uses running statistics exactly as BatchNorm does.

On CUDA the forward (and its backward) can run on the fused Triton kernel (`rnp_fast.kernels`):
``kernel`` is "torch" (plain PyTorch, the default and the only choice elsewhere), "triton", or
"auto" (the kernel only at the shapes where the measured table in `kernels.auto_table` says it
wins; PyTorch everywhere else, including every shape not measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with ``neuron_mask`` (initialised to 1) multiplying gamma."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        self.neuron_mask = nn.Parameter(torch.ones(num_features))
        self.kernel = "torch"

    def uses_triton(self, x: torch.Tensor) -> bool:
        if self.kernel == "torch" or not x.is_cuda or self.momentum is None or not self.track_running_stats:
            return False
        if self.kernel == "triton":
            return True
        from rnp_fast.kernels.auto_table import triton_wins

        return triton_wins(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_triton(x):
            from rnp_fast.kernels import masked_batch_norm

            if self.training:
                self.num_batches_tracked.add_(1)
            return masked_batch_norm(
                x,
                self.weight,
                self.bias,
                self.neuron_mask,
                self.running_mean,
                self.running_var,
                self.training,
                self.momentum,
                self.eps,
            )
        use_batch_stats = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight * self.neuron_mask,
            self.bias,
            use_batch_stats,
            self.momentum,
            self.eps,
        )


def set_bn_kernel(model: nn.Module, kernel: str) -> None:
    """torch, triton or auto for every masked BatchNorm of ``model`` (see the module docstring)."""
    if kernel not in ("torch", "triton", "auto"):
        raise ValueError(f"BatchNorm kernel must be torch, triton or auto, got {kernel!r}")
    for _, layer in masked_batchnorm_layers(model):
        layer.kernel = kernel


def masked_batchnorm_layers(model: nn.Module) -> list[tuple[str, MaskedBatchNorm2d]]:
    """(name, module) for every masked BatchNorm, in module-registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedBatchNorm2d)]


def clamp_masks_(model: nn.Module) -> None:
    """Project every mask back into [0, 1] (done after each optimiser step): two multi-tensor
    kernels for all layers instead of one launch per layer."""
    masks = [layer.neuron_mask for _, layer in masked_batchnorm_layers(model)]
    with torch.no_grad():
        torch._foreach_clamp_min_(masks, 0.0)
        torch._foreach_clamp_max_(masks, 1.0)
