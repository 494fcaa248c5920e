"""Masked BatchNorm: BatchNorm2d whose affine weight is multiplied by a learnable per-channel mask.

    y = (x - mean) / sqrt(var + eps) * (gamma * m) + beta        (the bias is not masked)

It subclasses ``nn.BatchNorm2d`` so state dicts keep BatchNorm's layout plus ``neuron_mask``, and
eval mode uses running statistics exactly as BatchNorm does.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def masked_batchnorm_layers(model: nn.Module) -> list[tuple[str, MaskedBatchNorm2d]]:
    """(name, module) for every masked BatchNorm, in module-registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedBatchNorm2d)]


def clamp_masks_(model: nn.Module) -> None:
    """Project every mask back into [0, 1] (done after each optimiser step)."""
    with torch.no_grad():
        for _, layer in masked_batchnorm_layers(model):
            layer.neuron_mask.clamp_(0.0, 1.0)
