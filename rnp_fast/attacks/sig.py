"""SIG (Barni et al. 2019): a clean-label trigger that adds a horizontal sine to every row.

x'[c, i, j] = clip(round(x + d * sin(2 pi j f / W))), d = 20, f = 6. The signal is evaluated in
float64 and stored in float32; the sum is float32, rounded half to even and saturated, so a NumPy
reference reproduces it exactly. The reference implementation instead blends a stored mask
(``signal_cifar10_mask.npy``, whose negative lobes wrapped around in uint8) at a = 0.2: that is
``reference_sig_trigger``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from rnp_fast.attacks.base import Trigger
from rnp_fast.attacks.blend import BlendTrigger, round_to_uint8
from rnp_fast.errors import UserError


class SigTrigger(Trigger):
    """Adds ``delta * sin(2 pi j frequency / W)`` to column j of every row and channel."""

    def __init__(self, delta: float = 20.0, frequency: float = 6.0, name: str = "sig"):
        self.delta, self.frequency, self.name = delta, frequency, name
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}

    def signal(self, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 [W]: the per-column offset (computed once per width and device)."""
        key = (width, torch.device(device))
        if key not in self._cache:
            columns = torch.arange(width, dtype=torch.float64)
            wave = self.delta * torch.sin(2 * math.pi * columns * self.frequency / width)
            self._cache[key] = wave.to(device=device, dtype=torch.float32)
        return self._cache[key]

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        return round_to_uint8(images.float() + self.signal(images.shape[-1], images.device))


def load_signal_mask(path: str | Path, image_size: int = 32) -> np.ndarray:
    """The reference's stored signal: uint8 [H, W] from a ``.npy`` file, validated."""
    try:
        mask = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read a SIG mask .npy file ({error})") from error
    mask = mask.reshape(mask.shape[:2]) if mask.ndim == 3 and mask.shape[2] == 1 else mask
    if mask.shape != (image_size, image_size):
        raise UserError(f"{path}: SIG mask has shape {mask.shape}, expected ({image_size}, {image_size})")
    if not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 255:
        raise UserError(f"{path}: SIG mask values must lie in 0..255")
    # astype truncates like the reference, which stores and reads the mask as uint8.
    return mask.astype(np.uint8)


def reference_sig_trigger(
    path: str | Path, alpha: float = 0.2, image_size: int = 32, channels: int = 3
) -> BlendTrigger:
    """The reference's SIG: blend the stored mask (same in every channel) at ``alpha``."""
    mask = torch.from_numpy(load_signal_mask(path, image_size))
    pattern = mask.expand(channels, image_size, image_size)
    return BlendTrigger(pattern, alpha, name="sig-reference")
