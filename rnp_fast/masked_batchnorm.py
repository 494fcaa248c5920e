"""Masked BatchNorm: BatchNorm2d whose affine weight is multiplied by a learnable per-channel mask.

    y = (x - mean) / sqrt(var + eps) * (gamma * m) + beta        (the bias is not masked)

It subclasses ``nn.BatchNorm2d`` so state dicts keep BatchNorm's layout plus ``neuron_mask``, and
eval mode uses running statistics exactly as BatchNorm does.

Two implementations, chosen per layer once, when the engine is applied (`choose_bn_kernels`),
never inside ``forward``: plain PyTorch (``F.batch_norm`` with weight ``gamma * m``), or the fused
masked-BatchNorm operator of `rnp_fast.kernels` (one custom operator: the Triton kernel on CUDA,
a PyTorch implementation on the CPU, so compiled steps that call it are testable anywhere).
``auto`` takes the operator only where the measured table says the whole recover step is faster
(`kernels.auto_table`); PyTorch everywhere else, including every case not measured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("torch", "triton", "auto")


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with ``neuron_mask`` (initialised to 1) multiplying gamma."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, **kwargs):
        super().__init__(num_features, eps=eps, momentum=momentum, **kwargs)
        self.neuron_mask = nn.Parameter(torch.ones(num_features))
        self.fused = False  # set by choose_bn_kernels: the fused operator instead of F.batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        if self.fused:
            return fused_masked_batch_norm(
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


def fused_masked_batch_norm(*args):
    """Replaced by the fused operator's functional API the first time a layer chooses it."""
    raise RuntimeError("the fused masked BatchNorm was not chosen through choose_bn_kernels")


def choose_bn_kernels(
    model: nn.Module, kernel: str, sample: torch.Tensor | None = None, amp: torch.dtype | None = None
) -> None:
    """torch, triton or auto for every masked BatchNorm of ``model``, decided here once.

    ``triton`` takes the fused operator where it can run (the layer keeps PyTorch's batch-norm
    semantics it cannot serve: no running statistics, or a cumulative moving average); ``auto``
    asks the measured table about the recover step of this model at ``sample``'s shape."""
    if kernel not in KERNELS:
        raise ValueError(f"BatchNorm kernel must be torch, triton or auto, got {kernel!r}")
    layers = masked_batchnorm_layers(model)
    fused = kernel == "triton" or (kernel == "auto" and auto_picks_fused(model, sample, amp))
    for _, layer in layers:
        layer.fused = fused and operator_serves(layer)
    if any(layer.fused for _, layer in layers):
        bind_fused_operator()


def operator_serves(layer: MaskedBatchNorm2d) -> bool:
    return layer.track_running_stats and layer.momentum is not None


def auto_picks_fused(model: nn.Module, sample: torch.Tensor | None, amp: torch.dtype | None) -> bool:
    if sample is None or not sample.is_cuda:
        return False
    from rnp_fast.kernels.auto_table import fused_wins

    return fused_wins(model, sample, amp)


def bind_fused_operator() -> None:
    global fused_masked_batch_norm
    from rnp_fast.kernels.ops import masked_batch_norm

    fused_masked_batch_norm = masked_batch_norm


def masked_batchnorm_layers(model: nn.Module) -> list[tuple[str, MaskedBatchNorm2d]]:
    """(name, module) for every masked BatchNorm, in module-registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MaskedBatchNorm2d)]


def clamp_masks_(masks: list[torch.Tensor]) -> None:
    """Project every mask back into [0, 1] (done after each optimiser step): two multi-tensor
    kernels for all layers instead of one launch per layer."""
    with torch.no_grad():
        torch._foreach_clamp_min_(masks, 0.0)
        torch._foreach_clamp_max_(masks, 1.0)


def mask_clamp(masks: list[torch.Tensor], engine):
    """The clamp run after every recovering step: compiled with the steps, where Inductor fuses
    both bounds over every layer's mask into one kernel; eager otherwise."""

    def clamp() -> None:
        clamp_masks_(masks)

    if not engine.compile:
        return clamp
    return torch.compile(clamp, fullgraph=True, backend=engine.compile_backend)
