"""FFCV pipeline pieces for `FFCVLoader` (this module imports FFCV; import it only when FFCV is there).

- `SeededOrder`: the traversal order of `DeviceLoader` (same seeded permutation per epoch).
- `IndexedDeviceOp` and its three kinds: operations that run on the device after ``ToDevice``
  and receive the batch's sample indices (FFCV passes ``batch_indices`` to any operation whose
  code carries ``with_indices = True``), so the trigger can be placed by dataset index.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ffcv.pipeline.operation import Operation
from ffcv.traversal_order.base import TraversalOrder

from rnp_fast.loaders.device_loader import epoch_order, image_transform


class SeededOrder(TraversalOrder):
    """Visits samples in `epoch_order(count, shuffle, seed, epoch)`, as `DeviceLoader` does.

    FFCV 1.0 sets up a custom order by calling the object it was given with the loader
    (``order(loader)``), so construction is split: ``__init__`` keeps the settings, ``__call__``
    binds the loader.
    """

    def __init__(self, shuffle: bool, seed: int):
        self.shuffle, self.order_seed = shuffle, seed  # TraversalOrder.__init__ overwrites .seed

    def __call__(self, loader) -> SeededOrder:
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order = epoch_order(len(self.indices), self.shuffle, self.order_seed, epoch).numpy()
        return self.indices[order]


class IndexedDeviceOp(Operation):
    """A torch operation on the device: ``run(batch, indices)`` with int64 dataset indices [B].

    Each call returns a fresh tensor, so no result aliases an FFCV buffer that a later batch reuses.
    """

    state_change: dict = {}

    def __init__(self, owner):
        super().__init__()
        self.owner = owner  # the FFCVLoader: poisoning plan, augmentation switches, epoch parameters

    def generate_code(self):
        run, device = self.run, self.owner.device

        def code(batch, _destination, batch_indices):
            return run(batch, torch.from_numpy(batch_indices.astype(np.int64)).to(device))

        code.with_indices = True
        return code

    def declare_state_and_memory(self, previous_state):
        return replace(previous_state, jit_mode=False, **self.state_change), None

    def run(self, batch: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PoisonAugmentNormalise(IndexedDeviceOp):
    """uint8 [B, C, H, W] -> the trigger by index, crop and flip, normalised float32 (as DeviceLoader)."""

    state_change = {"dtype": torch.float32}

    def run(self, images, indices):
        offsets, flips = self.owner.batch_params(indices)
        return image_transform(images, indices, offsets, flips, self.owner)


class PoisonLabels(IndexedDeviceOp):
    """int64 [B, 1] -> [B], with the poisoning plan's label on poisoned samples."""

    state_change = {"shape": ()}

    def run(self, labels, indices):
        labels = labels.reshape(-1)
        poison = self.owner.poison
        return poison.apply_labels(labels, indices) if poison is not None else labels.clone()


class BatchIndices(IndexedDeviceOp):
    """The batch's dataset indices, int64 [B] on the device."""

    state_change = {"shape": (), "dtype": torch.int64}

    def run(self, _labels, indices):
        return indices
