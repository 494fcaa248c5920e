"""Scoring pruning candidates: every step of the schedule evaluated on the test sets.

Two evaluators with one interface (``evaluator(model) -> Metrics``):
- `DeviceEvaluator`: device-resident test tensors, normalised per batch;
- `ReferenceEvaluator`: the reference's way, per-sample CPU transforms through a DataLoader.

`score_steps` applies each candidate to the original weights and evaluates it. In fast mode a
prune set shared by several thresholds is evaluated once; reference mode re-evaluates each, as the
reference does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from rnp_fast.evaluate import (
    Metrics,
    Outputs,
    TestSets,
    accuracy,
    metrics_from_outputs,
    model_outputs,
    predict,
)
from rnp_fast.loaders.reference_loader import PerSampleDataset
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.prune import PruneStep, pruned_state_dict

Evaluator = Callable[[nn.Module], Metrics]


class DeviceEvaluator:
    def __init__(self, data: TestSets, batch_size: int):
        self.data, self.batch_size = data, batch_size

    def __call__(self, model: nn.Module) -> Metrics:
        return metrics_from_outputs(model_outputs(model, self.data, self.batch_size), self.data)


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
        logits = [torch.cat([model(x.to(device)).float() for x, _ in loader]) for loader in self.loaders]
        return metrics_from_outputs(Outputs(*logits), self.data)


def cpu(data: ImageSet) -> ImageSet:
    return ImageSet(data.images.cpu(), data.labels.cpu())


def make_evaluator(mode: str, data: TestSets, batch_size: int) -> Evaluator:
    return DeviceEvaluator(data, batch_size) if mode == "fast" else ReferenceEvaluator(data, batch_size)


def score_steps(model: nn.Module, steps: list[PruneStep], evaluator: Evaluator, dedupe: bool = True) -> list[Metrics]:
    """Metrics of every step on the original weights of ``model`` (restored afterwards)."""
    original = {key: value.clone() for key, value in model.state_dict().items()}
    scored: dict[int, Metrics] = {}
    results = []
    try:
        for step in steps:
            if not (dedupe and step.count in scored):
                model.load_state_dict(pruned_state_dict(original, step.channels))
                scored[step.count] = evaluator(model)
            results.append(scored[step.count])
    finally:
        model.load_state_dict(original)
    return results


def holdout_accuracies(
    model: nn.Module, steps: list[PruneStep], holdout: ImageSet, mean, std, batch_size: int
) -> tuple[float, list[float]]:
    """Clean accuracy on the held-out defense images: unpruned, then per step."""
    device = next(model.parameters()).device
    images, labels = holdout.images.to(device), holdout.labels.to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)

    def score(m: nn.Module) -> Metrics:
        return accuracy(predict(m, images, mean_t, std_t, batch_size), labels)

    base = score(model)
    return base, score_steps(model, steps, score)
