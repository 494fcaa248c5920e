"""CIFAR-shaped random data for benchmarks: speed does not depend on pixel content.

50,000 training and 10,000 test images of 3x32x32 uint8 noise with uniform random labels over ten
classes, drawn from a fixed seed, and CIFAR-10's normalisation constants.
"""

from __future__ import annotations

import torch

from rnp_fast.loaders.sources import CIFAR10_MEAN, CIFAR10_STD, DataSource, ImageSet


def synthetic_cifar10_source(train_images: int = 50_000, test_images: int = 10_000, seed: int = 0) -> DataSource:
    generator = torch.Generator().manual_seed(seed)

    def images(count: int) -> ImageSet:
        pixels = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8, generator=generator)
        return ImageSet(pixels, torch.randint(0, 10, (count,), generator=generator))

    return DataSource("synthetic-cifar10", images(train_images), images(test_images), 10, CIFAR10_MEAN, CIFAR10_STD)
