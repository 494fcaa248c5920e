"""Seeded training augmentation: random crop with 4-pixel zero padding, then horizontal flip.

Parameters are drawn per sample index and per epoch from a seed, so the device loader (batched
tensor ops) and the reference-mode DataLoader (per-sample NumPy ops) apply the very same crop and
flip to the same image, and a run is reproducible on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PADDING = 4


@dataclass
class AugmentParams:
    """offsets: int64 [N, 2] (top, left) in 0..2*PADDING of the padded image; flips: bool [N]."""

    offsets: torch.Tensor
    flips: torch.Tensor


def draw_params(count: int, seed: int, epoch: int) -> AugmentParams:
    """The crop offsets and flips of every sample for one epoch (CPU generator, device-independent)."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch))
    offsets = torch.randint(0, 2 * PADDING + 1, (count, 2), generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    return AugmentParams(offsets, flips)


def mix_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``parts`` (distinct streams per epoch and purpose)."""
    sequence = np.random.SeedSequence([seed & 0xFFFFFFFF, *[p & 0xFFFFFFFF for p in parts]])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1)


def crop_flip_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Batched crop-and-flip. images: uint8 [B, C, H, W]; offsets: [B, 2]; flips: bool [B]."""
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (PADDING, PADDING, PADDING, PADDING))
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(width, device=images.device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reads the crop's columns backwards
    batch_index = torch.arange(batch, device=images.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the channel dim last: [B, H, W, C].
    cropped = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    # Back to a contiguous NCHW tensor: the gather leaves a channels-last stride pattern, and
    # the layout is the engine's choice (see DeviceLoader.channels_last), not an accident.
    return cropped.permute(0, 3, 1, 2).contiguous()


def crop_flip_image(image: np.ndarray, offset: tuple[int, int], flip: bool) -> np.ndarray:
    """The same transform on one uint8 [C, H, W] NumPy image (the reference-mode path)."""
    _, height, width = image.shape
    padded = np.pad(image, ((0, 0), (PADDING, PADDING), (PADDING, PADDING)))
    top, left = offset
    out = padded[:, top : top + height, left : left + width]
    return out[:, :, ::-1] if flip else out


def normalisation(mean, std, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std (numbers, one per channel) as float32 tensors on ``device``:
    the one place they are built, so every path normalises with the very same values."""
    return (
        torch.as_tensor(mean, dtype=torch.float32).to(device),
        torch.as_tensor(std, dtype=torch.float32).to(device),
    )


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 ``(x / 255 - mean) / std``, the ToTensor + Normalize arithmetic."""
    return images.float().div(255.0).sub(mean.view(1, -1, 1, 1)).div(std.view(1, -1, 1, 1))
