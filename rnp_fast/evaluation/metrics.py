"""Metrics: from the logits of both test sets to accuracies, ASR, losses and DER.

One forward pass over the clean test set and one over the poisoned test set give every metric:
the reference protocol (clean accuracy and ASR on non-target images), clean accuracy on the full
test set, robust accuracy (triggered images classified as their true label) and their losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rnp_fast.evaluation.test_sets import TestSets


@dataclass
class Outputs:
    """Per-image predictions (int64) and logits-derived log-probabilities' argmax inputs."""

    clean_logits: torch.Tensor  # float32 [N_clean, K]
    poisoned_logits: torch.Tensor  # float32 [N_poisoned, K]


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
        robust_acc=robust_accuracy(outputs.poisoned_logits, data.poisoned.labels),
    )


UNKNOWN_LABEL = -1  # a triggered image whose true label the Python API's caller did not give


def robust_accuracy(logits: torch.Tensor, true_labels: torch.Tensor) -> float:
    """Triggered images classified as their true label; NaN when the true labels are unknown."""
    if bool((true_labels == UNKNOWN_LABEL).any()):
        return float("nan")
    return accuracy(logits, true_labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (logits.argmax(1) == labels).float().mean().item()


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[float]:
    """Accuracy within each true class (NaN for a class with no image), in float32 like `accuracy`."""
    hits = torch.bincount(labels[logits.argmax(1) == labels], minlength=num_classes).float()
    return (hits / torch.bincount(labels, minlength=num_classes).float()).tolist()


def mean_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return F.cross_entropy(logits, labels).item()


def defense_effectiveness(before: Metrics, after: Metrics) -> float:
    """DER = [max(0, dASR) - max(0, dACC) + 1] / 2, d = before - after, ACC on the full test set."""
    d_asr = before.asr - after.asr
    d_acc = before.clean_acc_full - after.clean_acc_full
    return (max(0.0, d_asr) - max(0.0, d_acc) + 1.0) / 2.0
