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

    poisoned: bool [N]; labels: int64 [N] (the label each image carries when poisoned);
    noise: bool [N] or None, images shown in the trigger's noise mode with their TRUE label
    (WaNet's "cross" samples, which teach the network that only the exact warp is the trigger).
    """

    trigger: Trigger
    poisoned: torch.Tensor
    labels: torch.Tensor
    noise: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PoisonPlan:
        noise = self.noise.to(device) if self.noise is not None else None
        return PoisonPlan(self.trigger, self.poisoned.to(device), self.labels.to(device), noise)

    def apply(
        self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison the rows of a batch whose dataset ``indices`` the plan marks (static shapes)."""
        return self.apply_images(images, indices), self.apply_labels(labels, indices)

    def apply_images(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W]: the trigger on poisoned rows, noise mode on noise rows, others as they are."""
        flags = self.poisoned[indices]
        stamped = self.trigger.apply(images, indices)
        if self.noise is not None:  # disjoint from the poisoned rows; labels stay as they are
            noisy = self.trigger.apply_noise(images, indices)
            stamped = torch.where(self.noise[indices][:, None, None, None], noisy, stamped)
            flags = flags | self.noise[indices]
        return torch.where(flags[:, None, None, None], stamped, images)

    def apply_labels(self, labels: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """int64 [B]: the plan's label on poisoned rows, the true label elsewhere."""
        return torch.where(self.poisoned[indices], self.labels[indices], labels)


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
    noise = noise_samples(trigger, poisoned, rate, generator)
    return PoisonPlan(trigger, poisoned, poisoned_labels(labels, mode, target, num_classes), noise)


def noise_samples(trigger: Trigger, poisoned: torch.Tensor, rate: float, generator) -> torch.Tensor | None:
    """bool [N]: the noise-mode images of a trigger that has a noise mode (else None).

    They are drawn, after the poisoned images and from the same generator, among the images left
    clean, so earlier plans keep their poisoned set. Their count is the trigger's noise fraction
    of the whole set (WaNet: cross ratio x poisoning rate), capped by the clean images.
    """
    if not hasattr(trigger, "noise_fraction"):
        return None
    clean = torch.nonzero(~poisoned).flatten()
    count = min(len(clean), round(trigger.noise_fraction(rate) * len(poisoned)))
    noise = torch.zeros_like(poisoned)
    noise[clean[torch.randperm(len(clean), generator=generator)[:count]]] = True
    return noise


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
