"""Scoring pruning candidates: every step of the schedule evaluated on the test sets.

Per-model evaluators (``evaluator(model) -> Metrics``), used before and after the defense and per
epoch:
- `DeviceEvaluator`: device-resident test tensors, normalised per batch;
- `ReferenceEvaluator`: the reference's way, per-sample CPU transforms through a DataLoader.

Scoring a whole schedule (`score_steps`, `holdout_accuracies`) has three ways, picked by
`SweepOptions`:
- batched (fast mode's default): all candidates in one pass over the data (`batched_sweep`);
- sequential: each distinct prune set loaded into the model and evaluated on its own;
- reference mode: sequential through the reference evaluator, every step re-evaluated even when
  its prune set repeats, as the reference does.
Batched and sequential give the same predictions, bit for bit on CPU (a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from rnp_fast.batched_sweep import BatchedSweep, PruneSet
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
    def __init__(self, data: TestSets, batch_size: int, channels_last: bool = False):
        self.data, self.batch_size, self.channels_last = data, batch_size, channels_last

    def __call__(self, model: nn.Module) -> Metrics:
        outputs = model_outputs(model, self.data, self.batch_size, self.channels_last)
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
        logits = [torch.cat([model(x.to(device)).float() for x, _ in loader]) for loader in self.loaders]
        return metrics_from_outputs(Outputs(*logits), self.data)


def cpu(data: ImageSet) -> ImageSet:
    return ImageSet(data.images.cpu(), data.labels.cpu())


def make_evaluator(mode: str, data: TestSets, batch_size: int, channels_last: bool = False) -> Evaluator:
    if mode == "fast":
        return DeviceEvaluator(data, batch_size, channels_last)
    return ReferenceEvaluator(data, batch_size)


@dataclass
class SweepOptions:
    mode: str = "fast"  # fast or reference
    sweep_mode: str = "batched"  # batched or sequential (fast mode)
    batch_size: int = 512
    chunk_size: int = 0  # 0: from free memory
    amp: torch.dtype | None = None
    channels_last: bool = False
    warn: Callable[[str], None] | None = None

    @property
    def batched(self) -> bool:
        return self.mode == "fast" and self.sweep_mode == "batched"

    def sweep(self, image_sets: list[torch.Tensor], mean, std) -> BatchedSweep:
        return BatchedSweep(
            image_sets, mean, std, self.batch_size, self.chunk_size, self.amp, self.channels_last, self.warn
        )


def prune_set(step: PruneStep) -> PruneSet:
    return frozenset((channel.layer, channel.index) for channel in step.channels)


def score_steps(model: nn.Module, steps: list[PruneStep], data: TestSets, options: SweepOptions) -> list[Metrics]:
    """Test-set metrics of every step, pruning the original weights of ``model`` (left unchanged)."""
    if options.batched:
        logits = options.sweep([data.clean.images, data.poisoned.images], data.mean, data.std).score(
            model, [prune_set(step) for step in steps]
        )
        return [metrics_from_outputs(Outputs(*pair), data) for pair in logits]
    evaluator = make_evaluator(options.mode, data, options.batch_size, options.channels_last)
    return score_sequentially(model, steps, evaluator, dedupe=options.mode == "fast")


def score_sequentially(model: nn.Module, steps: list[PruneStep], evaluator, dedupe: bool = True) -> list:
    """``evaluator`` of every step, one pruned copy of the weights at a time (``model`` restored)."""
    original = {key: value.clone() for key, value in model.state_dict().items()}
    scored: dict[PruneSet, object] = {}
    results = []
    try:
        for step in steps:
            key = prune_set(step)
            if not (dedupe and key in scored):
                model.load_state_dict(pruned_state_dict(original, step.channels))
                scored[key] = evaluator(model)
            results.append(scored[key])
    finally:
        model.load_state_dict(original)
    return results


def holdout_accuracies(
    model: nn.Module, steps: list[PruneStep], holdout: ImageSet, mean, std, options: SweepOptions
) -> tuple[float, list[float]]:
    """Clean accuracy on the held-out defense images: unpruned, then per step."""
    device = next(model.parameters()).device
    images, labels = holdout.images.to(device), holdout.labels.to(device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.tensor(std, dtype=torch.float32, device=device)
    if options.batched:
        candidates = [frozenset()] + [prune_set(step) for step in steps]
        logits = options.sweep([images], mean_t, std_t).score(model, candidates)
        accuracies = [accuracy(per_set[0], labels) for per_set in logits]
        return accuracies[0], accuracies[1:]

    def score(m: nn.Module) -> float:
        return accuracy(predict(m, images, mean_t, std_t, options.batch_size, options.channels_last), labels)

    return score(model), score_sequentially(model, steps, score)
