"""Trojan (Liu et al. 2018) as the reference stamps it: a fixed additive patch, x' = clip(x + T).

The reference adds its float patch to the uint8 image and casts with ``astype('uint8')``, which
truncates, and wraps sums above 255. Since x is an integer, floor(x + T) = x + floor(T), so we floor
T once when loading and add in int16: identical to the reference wherever it does not wrap, and
saturating where it does (the spec's choice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rnp_fast.attacks.base import Trigger
from rnp_fast.errors import UserError


class AdditiveTrigger(Trigger):
    """x' = clamp(x + patch, 0, 255) with ``patch`` int16 [C, H, W] (values in -255..255)."""

    def __init__(self, patch: torch.Tensor, name: str = "trojan"):
        if patch.ndim != 3:
            raise ValueError(f"additive patch must be [C, H, W], got shape {tuple(patch.shape)}")
        self.patch = patch.to("cpu", torch.int16).clamp(-255, 255)
        self.name = name
        self._cache: dict[torch.device, torch.Tensor] = {}

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        if images.device not in self._cache:
            self._cache[images.device] = self.patch.to(images.device)
        summed = images.to(torch.int16) + self._cache[images.device]
        return summed.clamp_(0, 255).to(torch.uint8)


def load_reference_trojan(path: str | Path, image_size: int = 32, channels: int = 3) -> AdditiveTrigger:
    """The reference's trojan patch: ``.npz`` key ``x``, float [C, H, W] (3x32x32 for CIFAR-10)."""
    expected = (channels, image_size, image_size)
    try:
        with np.load(path, allow_pickle=False) as archive:
            patch = archive["x"]
    except (OSError, ValueError, KeyError) as error:
        message = f"{path}: cannot read a trojan .npz with key 'x' of shape {expected} ({error})"
        raise UserError(message) from error
    if patch.shape != expected:
        raise UserError(f"{path}: trojan pattern 'x' has shape {patch.shape}, expected {expected}")
    if not np.isfinite(patch).all():
        raise UserError(f"{path}: trojan pattern 'x' holds non-finite values")
    floored = np.floor(np.clip(patch, -255, 255)).astype(np.int16)
    return AdditiveTrigger(torch.from_numpy(floored), name="trojan")


def seeded_trojan(image_size: int = 32, channels: int = 3, seed: int = 0, size: int = 3) -> AdditiveTrigger:
    """Without the reference file: a random 0..255 ``size`` x ``size`` patch drawn from ``seed``.

    It sits where the reference's does (rows/cols H - 7 .. H - 5, i.e. 25..27 on 32x32), so runs on
    other datasets (8x8 digits: rows/cols 1..3) still get a fixed additive trojan-style trigger.
    """
    top = max(0, image_size - 7)
    if top + size > image_size:
        raise ValueError(f"a {size}x{size} trojan patch does not fit a {image_size}x{image_size} image")
    generator = torch.Generator().manual_seed(seed)
    patch = torch.zeros(channels, image_size, image_size, dtype=torch.int16)
    values = torch.randint(0, 256, (channels, size, size), generator=generator)
    patch[:, top : top + size, top : top + size] = values.to(torch.int16)
    return AdditiveTrigger(patch, name="trojan-seeded")
