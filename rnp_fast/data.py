"""The defense data: a seeded random subset of the clean training set, part of it held out.

``ratio`` of the training images are drawn once from the run's seed (the reference's 500 of
CIFAR-10's 50,000 at ratio 0.01). The first ``holdout`` fraction of that draw is kept aside and
never trained on: it scores the pruning candidates when the threshold is chosen from clean data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rnp_fast.config import DataConfig
from rnp_fast.errors import UserError
from rnp_fast.loaders.augment import mix_seed
from rnp_fast.loaders.sources import DataSource, ImageSet
from rnp_fast.rule_power import defense_sizes

SUBSET_STREAM = 3


@dataclass
class DefenseData:
    train: ImageSet  # used by unlearning and recovering
    holdout: ImageSet  # used only to choose the threshold

    @property
    def rule_data(self) -> str:
        """What the threshold rule scores: the held-out images, or (none held out, e.g. --holdout 0)
        the training images, which the summary and the log then name as such."""
        return "held-out images" if len(self.holdout) else "training images"

    @property
    def rule_images(self) -> ImageSet:
        return self.holdout if len(self.holdout) else self.train


def defense_data(source: DataSource, config: DataConfig) -> DefenseData:
    total = len(source.train)
    count, held = defense_sizes(total, config.ratio, config.holdout)  # the sizes the rule's check counted
    if count < 2:
        raise UserError(
            f"--ratio {config.ratio} of {total} training images gives {count} defense images; need at least 2"
        )
    if count - held < 2:
        raise UserError(
            f"--holdout {config.holdout} holds {held} of the {count} defense images aside and leaves {count - held} "
            "to train on; need at least 2 (lower --holdout or raise --ratio)"
        )
    generator = torch.Generator().manual_seed(mix_seed(config.seed, SUBSET_STREAM))
    chosen = torch.randperm(total, generator=generator)[:count]
    return DefenseData(source.train.subset(chosen[held:]), source.train.subset(chosen[:held]))
