"""Per-model evaluators (``evaluator(model) -> Metrics``): before and after the defense, per epoch.

- `DeviceEvaluator`: device-resident test tensors, normalised per batch (the fast mode);
- `ReferenceEvaluator`: the reference's way, per-sample CPU transforms through a DataLoader.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from rnp_fast.evaluation.metrics import Metrics, Outputs, metrics_from_outputs
from rnp_fast.evaluation.predict import model_outputs, no_logits
from rnp_fast.evaluation.test_sets import TestSets
from rnp_fast.loaders.reference_loader import PerSampleDataset
from rnp_fast.loaders.sources import ImageSet

Evaluator = Callable[[nn.Module], Metrics]


class DeviceEvaluator:
    def __init__(self, data: TestSets, batch_size: int, channels_last: bool = False, amp: torch.dtype | None = None):
        self.data, self.batch_size, self.channels_last, self.amp = data, batch_size, channels_last, amp

    def __call__(self, model: nn.Module) -> Metrics:
        outputs = model_outputs(model, self.data, self.batch_size, self.channels_last, self.amp)
        return metrics_from_outputs(outputs, self.data)


class ReferenceEvaluator:
    """Evaluates through DataLoaders over per-sample transformed CPU images."""

    def __init__(self, data: TestSets, batch_size: int):
        self.data = data
        mean, std = data.mean.tolist(), data.std.tolist()
        self.loaders = [
            DataLoader(PerSampleDataset(cpu(images), mean, std, augment=False, seed=0), batch_size=batch_size)
            for images in (data.clean, data.poisoned)
        ]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> Metrics:
        model.eval()
        device = next(model.parameters()).device
        logits = [
            torch.cat([model(x.to(device)).float() for x, _ in loader]) if len(loader.dataset) else no_logits(device)
            for loader in self.loaders
        ]
        return metrics_from_outputs(Outputs(*logits), self.data)


def cpu(data: ImageSet) -> ImageSet:
    return ImageSet(data.images.cpu(), data.labels.cpu())


def make_evaluator(
    mode: str, data: TestSets, batch_size: int, channels_last: bool = False, amp: torch.dtype | None = None
) -> Evaluator:
    """The fast mode's evaluator (the engine's layout and precision), or the reference's."""
    if mode == "fast":
        return DeviceEvaluator(data, batch_size, channels_last, amp)
    return ReferenceEvaluator(data, batch_size)
