"""The Python API's data: images and labels given as Python objects, made into the pipeline's sets.

Every loader and evaluator of the pipeline reads uint8 ``[N, C, H, W]`` images and int64 labels
(`loaders.sources.ImageSet`), normalised per batch on the device. The caller may give:

- ``(images, labels)``: a tensor or ndarray of uint8 (0..255) or float (0..1) images, channels
  first ``[N, C, H, W]`` or last ``[N, H, W, C]`` (the channel count is ``len(mean)``), and labels;
- a ``torch.utils.data.Dataset`` of ``(image, label)`` pairs (each image as above, without N).

Float images are stored as 8-bit, as the pipeline does with every dataset (``round(x * 255)``):
images that came from 8-bit files are unchanged by it; others change by at most 0.5/255, and a
warning says so.

The test sets: ``test`` is the clean test set; ``poisoned`` holds triggered images with the label
the attack wants (and, optionally as a third element, their true labels, for the robust accuracy).
When every poisoned label is one class (an all-to-one attack), the clean accuracy follows the
reference protocol and leaves out that class's images, as the CLI does; ``clean_acc_full`` keeps
them all.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rnp_fast.errors import UserError
from rnp_fast.evaluation.metrics import UNKNOWN_LABEL
from rnp_fast.evaluation.test_sets import TestSets, placed_test_sets
from rnp_fast.loaders.sources import ImageSet


def as_tensor(value) -> torch.Tensor:
    """A CPU tensor from a tensor, an ndarray, or anything NumPy reads (a PIL image, a list)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return torch.from_numpy(np.ascontiguousarray(np.asarray(value)))


def parts(data, name: str) -> list:
    """The elements of ``(images, labels[, ...])``, or of a Dataset's (image, label) pairs, stacked."""
    if isinstance(data, (tuple, list)):
        return list(data)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        kind = type(data).__name__
        raise UserError(f"{name} must be (images, labels) or a torch Dataset of (image, label), got {kind}")
    items = [data[index] for index in range(len(data))]
    if not items:
        raise UserError(f"{name} is an empty Dataset")
    return [torch.stack([as_tensor(item[0]) for item in items]), torch.tensor([int(item[1]) for item in items])]


def image_set(data, channels: int, name: str) -> ImageSet:
    """``data`` as uint8 [N, C, H, W] images and int64 labels."""
    given = parts(data, name)
    if len(given) != 2:
        raise UserError(f"{name} must be (images, labels), got {len(given)} elements")
    return checked_set(given[0], given[1], channels, name)


def checked_set(images, labels, channels: int, name: str) -> ImageSet:
    images = channels_first(to_uint8(as_tensor(images), name), channels, name)
    labels = label_tensor(labels, name)
    if len(labels) != len(images):
        raise UserError(f"{name}: {len(images)} images but {len(labels)} labels")
    return ImageSet(images.contiguous(), labels)


def to_uint8(images: torch.Tensor, name: str) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images
    if images.is_floating_point():
        return quantised(images, name)
    if images.dtype in (torch.bool, torch.complex64, torch.complex128) or images.numel() == 0:
        raise UserError(f"{name}: images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    if int(images.min()) < 0 or int(images.max()) > 255:
        raise UserError(f"{name}: integer images must lie in 0..255")
    return images.to(torch.uint8)


def quantised(images: torch.Tensor, name: str) -> torch.Tensor:
    """Float images in [0, 1] as 8-bit (see the module docstring)."""
    if not bool(torch.isfinite(images).all()) or float(images.min()) < 0 or float(images.max()) > 1:
        raise UserError(f"{name}: float images must lie in [0, 1] (give them before normalisation)")
    scaled = images.double() * 255.0
    rounded = scaled.round()
    if float((scaled - rounded).abs().max()) > 1e-3:
        warnings.warn(f"{name}: float images are stored as 8-bit (changes of up to 0.5/255)", stacklevel=4)
    return rounded.to(torch.uint8)


def channels_first(images: torch.Tensor, channels: int, name: str) -> torch.Tensor:
    """[N, C, H, W] from [N, C, H, W], [N, H, W, C] or (one channel) [N, H, W]."""
    if images.dim() == 3 and channels == 1:
        return images.unsqueeze(1)
    if images.dim() == 4 and images.shape[1] == channels:
        return images
    if images.dim() == 4 and images.shape[-1] == channels:
        return images.permute(0, 3, 1, 2)
    raise UserError(
        f"{name}: images of shape {tuple(images.shape)} do not have {channels} channels (len(mean)) "
        "first or last: give [N, C, H, W] or [N, H, W, C]"
    )


def label_tensor(labels, name: str) -> torch.Tensor:
    labels = as_tensor(labels)
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise UserError(f"{name}: labels must be whole class numbers")
    labels = labels.long().reshape(-1)
    if len(labels) and int(labels.min()) < 0:
        raise UserError(f"{name}: labels must be >= 0")
    return labels


def empty_set(channels: int, image_shape: tuple[int, ...]) -> ImageSet:
    """No images (a test set the caller did not give): its metrics are NaN."""
    return ImageSet(torch.empty(0, channels, *image_shape[-2:], dtype=torch.uint8), torch.empty(0, dtype=torch.long))


def poisoned_sets(poisoned, channels: int) -> tuple[ImageSet, torch.Tensor]:
    """(triggered images with their true labels, or UNKNOWN_LABEL; the attack's labels)."""
    given = parts(poisoned, "poisoned")
    if len(given) not in (2, 3):
        raise UserError("poisoned must be (images, attack labels) or (images, attack labels, true labels)")
    targets = checked_set(given[0], given[1], channels, "poisoned")
    true = label_tensor(given[2], "poisoned true labels") if len(given) == 3 else None
    if true is not None and len(true) != len(targets):
        raise UserError(f"poisoned: {len(targets)} images but {len(true)} true labels")
    true = true if true is not None else torch.full_like(targets.labels, UNKNOWN_LABEL)
    return ImageSet(targets.images, true), targets.labels


def caller_test_sets(test, poisoned, train: ImageSet, mean, std, device: torch.device) -> TestSets:
    """The caller's clean and poisoned test sets on ``device`` (either may be None: empty)."""
    channels = len(mean)
    clean = image_set(test, channels, "test") if test is not None else empty_set(channels, train.images.shape)
    if poisoned is not None:
        triggered, targets = poisoned_sets(poisoned, channels)
    else:
        triggered, targets = empty_set(channels, train.images.shape), torch.empty(0, dtype=torch.long)
    return placed_test_sets(clean, reference_mask(clean.labels, targets), triggered, targets, mean, std, device)


def reference_mask(clean_labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The clean images the reference protocol scores: all but the target class of an
    all-to-one attack (every poisoned label the same), else all of them."""
    if len(targets) and bool((targets == targets[0]).all()):
        return clean_labels != targets[0]
    return torch.ones_like(clean_labels, dtype=torch.bool)
