"""Evaluation: predictions and losses on the test sets, and the metrics derived from them.

One forward pass over the clean test set and one over the poisoned test set give every metric:
the reference protocol (clean accuracy and ASR on non-target images), clean accuracy on the full
test set, robust accuracy (triggered images classified as their true label) and their losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.attacks.base import PoisonPlan, Trigger, poisoned_test_plan
from rnp_fast.loaders.augment import normalise
from rnp_fast.loaders.sources import ImageSet


@dataclass
class TestSets:
    """Device-resident evaluation data (uint8 images, poisoned once, normalised per batch).

    clean: the whole clean test set; reference_mask: bool [N] selecting the images the reference
    protocol keeps (non-target for all2one); poisoned: the triggered test set with its true labels;
    poison_targets: the label a successful attack produces for each poisoned image.
    """

    clean: ImageSet
    reference_mask: torch.Tensor
    poisoned: ImageSet
    poison_targets: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.clean.images.device


def build_test_sets(
    test: ImageSet, trigger: Trigger, mode: str, target: int, num_classes: int, mean, std, device
) -> TestSets:
    """Poison the test set once (every kept image gets the trigger) and move it to ``device``."""
    keep, plan = poisoned_test_plan(trigger, test.labels, mode, target, num_classes)
    poisoned_images = stamp(plan, test.images[keep], torch.nonzero(keep).flatten())
    return TestSets(
        clean=ImageSet(test.images.to(device), test.labels.to(device)),
        reference_mask=keep.to(device),
        poisoned=ImageSet(poisoned_images.to(device), test.labels[keep].to(device)),
        poison_targets=plan.labels[keep].to(device),
        mean=torch.tensor(mean, dtype=torch.float32, device=device),
        std=torch.tensor(std, dtype=torch.float32, device=device),
    )


def stamp(plan: PoisonPlan, images: torch.Tensor, indices: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Apply the plan's trigger to every image, in chunks to bound memory."""
    parts = [plan.trigger.apply(images[i : i + chunk], indices[i : i + chunk]) for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else images


@dataclass
class Outputs:
    """Per-image predictions (int64) and logits-derived log-probabilities' argmax inputs."""

    clean_logits: torch.Tensor  # float32 [N_clean, K]
    poisoned_logits: torch.Tensor  # float32 [N_poisoned, K]


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, mean, std, batch_size: int, channels_last: bool = False
) -> torch.Tensor:
    """float32 logits [N, K] of ``model`` in eval mode over uint8 ``images``."""
    model.eval()
    chunks = [
        model(model_input(images[start : start + batch_size], mean, std, channels_last)).float()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks)


def model_input(images: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Normalised float images, in channels_last when asked (the convolutions follow the input)."""
    x = normalise(images, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def model_outputs(model: nn.Module, data: TestSets, batch_size: int, channels_last: bool = False) -> Outputs:
    return Outputs(
        predict(model, data.clean.images, data.mean, data.std, batch_size, channels_last),
        predict(model, data.poisoned.images, data.mean, data.std, batch_size, channels_last),
    )


@dataclass
class Metrics:
    clean_acc: float  # reference protocol: non-target clean images
    clean_loss: float
    asr: float  # reference "PoisonACC": triggered images classified as the attack's label
    poison_loss: float
    clean_acc_full: float  # every clean test image
    robust_acc: float  # triggered images classified as their true label

    def as_dict(self) -> dict:
        return asdict(self)


def metrics_from_outputs(outputs: Outputs, data: TestSets) -> Metrics:
    clean_logits = outputs.clean_logits[data.reference_mask]
    clean_labels = data.clean.labels[data.reference_mask]
    return Metrics(
        clean_acc=accuracy(clean_logits, clean_labels),
        clean_loss=mean_loss(clean_logits, clean_labels),
        asr=accuracy(outputs.poisoned_logits, data.poison_targets),
        poison_loss=mean_loss(outputs.poisoned_logits, data.poison_targets),
        clean_acc_full=accuracy(outputs.clean_logits, data.clean.labels),
        robust_acc=accuracy(outputs.poisoned_logits, data.poisoned.labels),
    )


def evaluate(model: nn.Module, data: TestSets, batch_size: int = 512) -> Metrics:
    return metrics_from_outputs(model_outputs(model, data, batch_size), data)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels).float().mean().item()


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return F.cross_entropy(logits, labels).item()


def defense_effectiveness(before: Metrics, after: Metrics) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2, d = before - after, ACC on the full test set."""
    d_asr = before.asr - after.asr
    d_acc = before.clean_acc_full - after.clean_acc_full
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0
