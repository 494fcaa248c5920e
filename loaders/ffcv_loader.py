"""An FFCV loader with the `DeviceLoader` interface, for data that should not sit in device memory.

FFCV decodes raw uint8 images from a memory-mapped ``.beton`` (see `beton`) and moves each batch
to the device (``ToDevice``). Everything after that is a pipeline operation running on the device
with the sample indices of the batch (FFCV hands ``batch_indices`` to any operation whose code is
marked ``with_indices``):

    image: NDArrayDecoder -> ToTensor -> ToDevice -> PoisonAugmentNormalise
    label: IntDecoder     -> ToTensor -> ToDevice -> PoisonLabels

(the operations are in `ffcv_ops`, which imports FFCV; this module imports without it).

The order and the augmentation parameters come from the same seeded streams as `DeviceLoader`, and
the image operation calls the same `image_transform`, so both loaders yield identical batches.
``drop_last`` is off: FFCV's default would silently drop the last partial batch. FFCV sets torch's
intra-op thread count to its worker count when a loader is built and at every epoch; the caller's
count is restored each time (see `beton.torch_threads_kept`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from rnp_fast.errors import UserError
from rnp_fast.loaders.beton import IMAGE, LABEL, open_beton, require_ffcv, torch_threads_kept
from rnp_fast.loaders.device_loader import OnDeviceBatches

INDEX = "index"  # an extra output (from the label field) carrying the batch's dataset indices


class FFCVLoader(OnDeviceBatches):
    """Iterates ``(images float32 [B, C, H, W], labels int64 [B])`` (plus indices if asked) from a ``.beton``."""

    def __init__(self, path: str | Path, *settings, num_workers: int = 1, batches_ahead: int = 2, **options):
        """``settings``/``options``: `OnDeviceBatches`' (mean, std, batch_size, device, shuffle, ...)."""
        self.info = open_beton(path)
        super().__init__(len(self.info), *settings, **options)
        if self.poison is not None and len(self.poison.poisoned) != self.count:
            raise UserError(f"{path}: {self.count} images, but the poisoning plan covers {len(self.poison.poisoned)}")
        self.offsets = self.flips = None  # this epoch's augmentation parameters, set by __iter__
        with torch_threads_kept():
            self.loader = self._ffcv_loader(num_workers, batches_ahead)

    def _ffcv_loader(self, num_workers: int, batches_ahead: int):
        require_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToDevice, ToTensor

        from rnp_fast.loaders.ffcv_ops import BatchIndices, PoisonAugmentNormalise, PoisonLabels, SeededOrder

        def on_device(decoder, last):
            return [decoder, ToTensor(), ToDevice(self.device, non_blocking=True), last]

        pipelines = {
            IMAGE: on_device(NDArrayDecoder(), PoisonAugmentNormalise(self)),
            LABEL: on_device(IntDecoder(), PoisonLabels(self)),
        }
        if self.yield_indices:
            pipelines[INDEX] = PipelineSpec(LABEL, transforms=on_device(IntDecoder(), BatchIndices(self)))
        return Loader(
            str(self.info.path),
            batch_size=self.batch_size,
            num_workers=num_workers,
            order=SeededOrder(self.shuffle, self.seed),
            pipelines=pipelines,
            drop_last=False,
            batches_ahead=batches_ahead,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        self.offsets, self.flips = self.epoch_augmentation()
        self.loader.next_epoch = self.epoch  # FFCV asks its traversal order for this epoch
        with torch_threads_kept():
            batches = iter(self.loader)  # starts FFCV's epoch thread
        for batch in batches:
            yield tuple(batch)

    def batch_params(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This epoch's crop offsets and flips for the batch's dataset ``indices``."""
        return self.offsets[indices], self.flips[indices]
