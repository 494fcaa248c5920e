"""Metrics: from the logits of both test sets to accuracies, ASR, losses and DER.

One forward pass over the clean test set and one over the poisoned test set give every metric:
the reference protocol (clean accuracy and ASR on non-target images), clean accuracy on the full
test set, robust accuracy (triggered images classified as their true label) and their losses.

Every proportion comes with the images it was measured on (`Metrics.estimate`: its n and 95 %
Wilson interval), and a clean-accuracy drop with the paired interval of the same images scored
before and after (`drop`): the per-image outcomes behind each `Metrics` are kept for that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rnp_fast.evaluation.intervals import Estimate, PairedTable, paired_difference, wilson
from rnp_fast.evaluation.test_sets import TestSets

FIGURES = ("clean_acc", "clean_loss", "asr", "poison_loss", "clean_acc_full", "robust_acc")
PROPORTIONS = ("clean_acc", "asr", "clean_acc_full", "robust_acc")  # the figures with a count and an interval


@dataclass
class Outputs:
    """Per-image predictions (int64) and logits-derived log-probabilities' argmax inputs."""

    clean_logits: torch.Tensor  # float32 [N_clean, K]
    poisoned_logits: torch.Tensor  # float32 [N_poisoned, K]


@dataclass(frozen=True)
class ImageOutcomes:
    """Per test image (bool, CPU): what the counts and the paired intervals are made of."""

    clean_correct: torch.Tensor  # [N_clean] every clean test image: classified as its label
    non_target: torch.Tensor  # [N_clean] the images the reference protocol keeps (non-target)
    attack_hit: torch.Tensor  # [N_poisoned] triggered images classified as the attack's label
    robust_correct: torch.Tensor | None  # [N_poisoned] classified as their true label; None: unknown

    def hits(self, figure: str) -> torch.Tensor | None:
        """The images ``figure`` counts, as one bool per image (None: not measurable)."""
        if figure == "clean_acc":
            return self.clean_correct[self.non_target]
        if figure == "clean_acc_full":
            return self.clean_correct
        return self.attack_hit if figure == "asr" else self.robust_correct


@dataclass
class Metrics:
    clean_acc: float  # reference protocol: non-target clean images
    clean_loss: float
    asr: float  # reference "PoisonACC": triggered images classified as the attack's label
    poison_loss: float
    clean_acc_full: float  # every clean test image
    robust_acc: float  # triggered images classified as their true label
    images: ImageOutcomes | None = field(default=None, repr=False, compare=False)  # per image, for intervals

    def as_dict(self) -> dict:
        """The six figures (not the per-image outcomes)."""
        return {name: getattr(self, name) for name in FIGURES}

    def estimate(self, figure: str) -> Estimate:
        """``figure`` (one of `PROPORTIONS`) with its number of images and 95 % Wilson interval; its
        value None, with the reason, where it was not measured."""
        value = getattr(self, figure)
        if self.images is None:  # made by hand, not scored: the figure alone
            return Estimate(value, None, None) if math.isfinite(value) else Estimate(None, 0, None, "not measured")
        hits = self.images.hits(figure)
        if hits is None or not len(hits) or not math.isfinite(value):
            return Estimate(None, 0, None, unmeasured(figure, self.images))
        count = int(hits.sum())
        return Estimate(value, len(hits), wilson(count, len(hits)))


def unmeasured(figure: str, images: ImageOutcomes) -> str:
    """Why ``figure`` has no value: the images it needs were not given (the Python API's optional
    test sets), or no test image is left to count."""
    if figure == "robust_acc" and images.robust_correct is None:
        return "the triggered test images' true labels were not given"
    if figure in ("asr", "robust_acc"):
        return "no triggered test images"
    return "no clean test images of the non-target classes" if figure == "clean_acc" else "no clean test images"


def drop(before: Metrics, after: Metrics, figure: str = "clean_acc_full") -> Estimate:
    """``figure`` before minus after, measured on the same images: the paired 95 % interval of
    Newcombe's method 10, from the images right before and wrong after (and the other way)."""
    first, second = before.estimate(figure), after.estimate(figure)
    if first.value is None or second.value is None:
        return Estimate(None, 0, None, first.reason or second.reason)
    if before.images is None or after.images is None:  # made by hand: the difference alone
        return Estimate(first.value - second.value, None, None)
    was, now = before.images.hits(figure), after.images.hits(figure)
    table = PairedTable(
        both=int((was & now).sum()),
        lost=int((was & ~now).sum()),
        gained=int((~was & now).sum()),
        neither=int((~was & ~now).sum()),
    )
    return Estimate(first.value - second.value, table.n, paired_difference(table))


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
        images=image_outcomes(outputs, data),
    )


def image_outcomes(outputs: Outputs, data: TestSets) -> ImageOutcomes:
    """Which images each figure counts, from the same logits as the figures themselves."""
    known = not bool((data.poisoned.labels == UNKNOWN_LABEL).any())
    return ImageOutcomes(
        clean_correct=correct(outputs.clean_logits, data.clean.labels),
        non_target=data.reference_mask.cpu(),
        attack_hit=correct(outputs.poisoned_logits, data.poison_targets),
        robust_correct=correct(outputs.poisoned_logits, data.poisoned.labels) if known else None,
    )


def correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [N] on the CPU: each image classified as ``labels`` says (empty for an empty set)."""
    if len(labels) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (logits.argmax(1) == labels).cpu()


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
