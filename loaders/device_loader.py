"""A loader whose whole dataset lives on the device as uint8.

Images move to the device once. Each epoch draws a seeded order (``torch.randperm``) and seeded
augmentation parameters; every batch is gathered, poisoned, cropped, flipped and normalised with
batched tensor ops on the device. The last partial batch is kept: no image is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from rnp_fast.attacks.base import PoisonPlan
from rnp_fast.loaders.augment import crop_flip_batch, draw_params, mix_seed, normalisation, normalise
from rnp_fast.loaders.sources import ImageSet

ORDER_STREAM = 1  # separate seed streams for order and augmentation
AUGMENT_STREAM = 2


class OnDeviceBatches:
    """What every fast loader shares: its settings, its length, the epoch it serves, and that
    epoch's augmentation parameters. Subclasses supply ``__iter__`` over ``count`` images."""

    def __init__(
        self,
        count: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        batch_size: int,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: bool = False,
        seed: int = 0,
        poison: PoisonPlan | None = None,
        channels_last: bool = False,
        yield_indices: bool = False,
    ):
        self.count = count
        self.device = torch.device(device)
        self.mean, self.std = normalisation(mean, std, self.device)
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.poison = poison.to(self.device) if poison is not None else None
        self.channels_last = channels_last
        self.yield_indices = yield_indices  # also yield each batch's dataset indices (int64 [B])
        self.epoch = 0

    def __len__(self) -> int:
        return -(-self.count // self.batch_size)

    @property
    def num_images(self) -> int:
        return self.count

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def epoch_augmentation(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop offsets and flips for every image, on the device (drawn on the CPU)."""
        params = draw_params(self.count, mix_seed(self.seed, AUGMENT_STREAM), self.epoch)
        return params.offsets.to(self.device), params.flips.to(self.device)


class DeviceLoader(OnDeviceBatches):
    """Iterates ``(images float32 [B, C, H, W], labels int64 [B])`` batches on ``device``."""

    def __init__(self, data: ImageSet, *settings, **options):
        """``settings``/``options``: `OnDeviceBatches`' (mean, std, batch_size, device, shuffle, ...)."""
        super().__init__(len(data), *settings, **options)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)

    def epoch_order(self) -> torch.Tensor:
        return epoch_order(self.count, self.shuffle, self.seed, self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.epoch_order().to(self.device)
        offsets, flips = self.epoch_augmentation()
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            images, labels = self.batch(indices, offsets[indices], flips[indices])
            yield (images, labels, indices) if self.yield_indices else (images, labels)

    def batch(self, indices: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor):
        images, labels = self.images[indices], self.labels[indices]
        if self.poison is not None:
            labels = self.poison.apply_labels(labels, indices)
        images = image_transform(images, indices, offsets, flips, self)
        return images, labels


def epoch_order(count: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """int64 [count]: the dataset indices of one epoch, in order (a CPU generator: any device agrees)."""
    if not shuffle:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(mix_seed(seed, ORDER_STREAM, epoch))
    return torch.randperm(count, generator=generator)


def image_transform(images: torch.Tensor, indices: torch.Tensor, offsets, flips, options) -> torch.Tensor:
    """The on-device image path every fast loader shares: poison, crop and flip, normalise.

    images: uint8 [B, C, H, W] of dataset ``indices``; offsets/flips: that batch's augmentation
    parameters; ``options`` carries ``poison``, ``augment``, ``mean``, ``std``, ``channels_last``.
    """
    if options.poison is not None:
        images = options.poison.apply_images(images, indices)
    if options.augment:
        images = crop_flip_batch(images, offsets, flips)
    images = normalise(images, options.mean, options.std)
    if options.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images
