"""The test sets every evaluation scores: the clean test set and its poisoned copy, on the device.

The poisoned set is made once per run (every kept image gets the trigger) and stays on the
evaluation device as uint8, like the clean one; images are normalised per batch when scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnp_fast.attacks.base import PoisonPlan, Trigger, poisoned_test_plan
from rnp_fast.loaders.augment import normalisation
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
    poisoned = ImageSet(stamp(plan, test.images[keep], torch.nonzero(keep).flatten()), test.labels[keep])
    return placed_test_sets(test, keep, poisoned, plan.labels[keep], mean, std, device)


def placed_test_sets(
    clean: ImageSet, reference_mask: torch.Tensor, poisoned: ImageSet, poison_targets: torch.Tensor, mean, std, device
) -> TestSets:
    """`TestSets` on ``device``: every tensor moved there once, mean and std as float32 tensors."""
    mean, std = normalisation(mean, std, device)
    return TestSets(
        clean=ImageSet(clean.images.to(device), clean.labels.to(device)),
        reference_mask=reference_mask.to(device),
        poisoned=ImageSet(poisoned.images.to(device), poisoned.labels.to(device)),
        poison_targets=poison_targets.to(device),
        mean=mean,
        std=std,
    )


def stamp(plan: PoisonPlan, images: torch.Tensor, indices: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Apply the plan's trigger to every image, in chunks to bound memory."""
    parts = [plan.trigger.apply(images[i : i + chunk], indices[i : i + chunk]) for i in range(0, len(images), chunk)]
    return torch.cat(parts) if parts else images
