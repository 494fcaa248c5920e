"""The reference's data path: a map-style Dataset with per-sample CPU transforms and a DataLoader.

This is how the reference feeds its model (one image at a time through pad/crop/flip, ToTensor
and Normalize, collated into batches on the CPU). It exists as the baseline for parity tests and
speed comparisons; it draws the same seeded order and augmentation parameters as `DeviceLoader`,
so both paths produce identical batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rnp_fast.loaders.augment import crop_flip_image, draw_params, mix_seed
from rnp_fast.loaders.device_loader import AUGMENT_STREAM, ORDER_STREAM
from rnp_fast.loaders.sources import ImageSet


class PerSampleDataset(Dataset):
    """Returns (float32 [C, H, W] normalised image, label) for one index."""

    def __init__(self, data: ImageSet, mean, std, augment: bool, seed: int):
        self.images = data.images.numpy()
        self.labels = data.labels.tolist()
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]
        self.augment, self.seed = augment, seed
        self.params = None

    def set_epoch(self, epoch: int) -> None:
        if self.augment:
            self.params = draw_params(len(self.labels), mix_seed(self.seed, AUGMENT_STREAM), epoch)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment:
            offset = tuple(self.params.offsets[index].tolist())
            image = crop_flip_image(image, offset, bool(self.params.flips[index]))
        # ToTensor then Normalize, in float32 as torchvision does.
        scaled = np.ascontiguousarray(image).astype(np.float32) / np.float32(255.0)
        return torch.from_numpy((scaled - self.mean) / self.std), self.labels[index]


class SeededOrder(Sampler):
    """The same per-epoch permutation as DeviceLoader (or the identity without shuffling)."""

    def __init__(self, count: int, shuffle: bool, seed: int):
        self.count, self.shuffle, self.seed, self.epoch = count, shuffle, seed, 0

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.count))
        generator = torch.Generator().manual_seed(mix_seed(self.seed, ORDER_STREAM, self.epoch))
        return iter(torch.randperm(self.count, generator=generator).tolist())

    def __len__(self) -> int:
        return self.count


class ReferenceLoader:
    """DataLoader wrapper with the `DeviceLoader` interface (set_epoch, num_images, iteration)."""

    def __init__(
        self,
        data: ImageSet,
        mean,
        std,
        batch_size: int,
        device="cpu",
        shuffle=False,
        augment=False,
        seed: int = 0,
        num_workers: int = 0,
    ):
        self.dataset = PerSampleDataset(data, mean, std, augment, seed)
        self.sampler = SeededOrder(len(data), shuffle, seed)
        self.batch_size = batch_size
        self.loader = DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers)
        self.device = torch.device(device)
        self.set_epoch(0)

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device), labels.to(self.device)
