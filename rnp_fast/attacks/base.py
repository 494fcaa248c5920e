"""The trigger interface and the poisoning plan shared by every attack.

A trigger is a deterministic function of a uint8 image batch ``[N, C, H, W]`` (values 0..255) that
runs on whatever device the batch lives on. Randomness an attack needs (a noise pattern, a warp
field) is drawn once from the attack's seed when the trigger is built, so the same run always
poisons the same way. Which images are poisoned, and with which labels, is a `PoisonPlan`,
chosen once from the poisoning seed and applied batch by batch by the loaders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LABEL_MODES = ("all2one", "all2all", "clean-label")


class Trigger:
    """Base class: ``apply`` returns a new uint8 batch with the trigger stamped in."""

    name = "trigger"

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """images: uint8 [N, C, H, W]; indices: int64 [N] dataset indices (for per-sample noise)."""
        raise NotImplementedError


def poisoned_labels(labels: torch.Tensor, mode: str, target: int, num_classes: int) -> torch.Tensor:
    """The label a poisoned image carries under ``mode`` (clean-label keeps the true label)."""
    if mode == "all2one":
        return torch.full_like(labels, target)
    if mode == "all2all":
        return (labels + 1) % num_classes
    if mode == "clean-label":
        return labels.clone()
    raise ValueError(f"unknown label mode {mode!r}; choose one of {', '.join(LABEL_MODES)}")


@dataclass
class PoisonPlan:
    """Which images of a set are poisoned and what they are relabelled to.

    poisoned: bool [N]; labels: int64 [N] (the label each image carries when poisoned).
    """

    trigger: Trigger
    poisoned: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device | str) -> PoisonPlan:
        return PoisonPlan(self.trigger, self.poisoned.to(device), self.labels.to(device))

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison the rows of a batch whose dataset ``indices`` the plan marks (static shapes)."""
        flags = self.poisoned[indices]
        stamped = self.trigger.apply(images, indices)
        images = torch.where(flags[:, None, None, None], stamped, images)
        labels = torch.where(flags, self.labels[indices], labels)
        return images, labels


def training_plan(
    trigger: Trigger,
    labels: torch.Tensor,
    rate: float,
    mode: str,
    target: int,
    num_classes: int,
    seed: int,
) -> PoisonPlan:
    """Poison ``rate`` of the training set, chosen once from ``seed``.

    all2one / all2all draw from every image (as the reference does); clean-label draws only from
    target-class images, ``rate`` still being a fraction of the whole set, capped by that class.
    """
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.arange(len(labels))
    if mode == "clean-label":
        candidates = candidates[labels == target]
    count = min(len(candidates), round(rate * len(labels)))
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
    poisoned = torch.zeros(len(labels), dtype=torch.bool)
    poisoned[chosen] = True
    return PoisonPlan(trigger, poisoned, poisoned_labels(labels, mode, target, num_classes))


def poisoned_test_plan(trigger: Trigger, labels: torch.Tensor, mode: str, target: int, num_classes: int):
    """Every test image gets the trigger; all2one and clean-label keep only non-target images.

    Returns (keep: bool [N], plan) where ``keep`` selects the images of the poisoned test set.
    """
    keep = labels != target if mode in ("all2one", "clean-label") else torch.ones_like(labels, dtype=torch.bool)
    target_mode = "all2one" if mode == "clean-label" else mode
    plan = PoisonPlan(
        trigger,
        torch.ones(len(labels), dtype=torch.bool),
        poisoned_labels(labels, target_mode, target, num_classes),
    )
    return keep, plan
