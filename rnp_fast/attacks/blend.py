"""Blended trigger (Chen et al. 2017): x' = (1 - a) x + a t with a fixed pattern t.

Exact arithmetic, so that uint8 outputs are reproducible bit for bit on any device and by a NumPy
reference: everything is float32, ``x * float32(1 - a) + float32(a) * t`` (two roundings, no fused
multiply-add in eager mode), then round half to even (``torch.round`` / ``np.round``) and clamp to
0..255. The reference truncates with ``astype('uint8')`` instead; rounding is at most one level apart.
"""

from __future__ import annotations

import numpy as np
import torch

from rnp_fast.attacks.base import Trigger


def round_to_uint8(values: torch.Tensor) -> torch.Tensor:
    """float pixel values -> uint8: round half to even, then saturate to 0..255."""
    return torch.round(values).clamp_(0, 255).to(torch.uint8)


def as_uint8_pattern(pattern, what: str = "pattern") -> torch.Tensor:
    """A uint8 [C, H, W] CPU tensor from a tensor or array (values must already be 0..255)."""
    tensor = pattern if isinstance(pattern, torch.Tensor) else torch.from_numpy(np.array(pattern))
    if tensor.ndim != 3:
        raise ValueError(f"{what} must be [C, H, W], got shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        if tensor.is_floating_point() and not torch.equal(tensor, tensor.round()):
            raise ValueError(f"{what} must hold integer pixel values 0..255")
        if tensor.numel() and (tensor.min() < 0 or tensor.max() > 255):
            raise ValueError(f"{what} values must lie in 0..255")
    return tensor.detach().to("cpu", torch.uint8).contiguous()


class BlendTrigger(Trigger):
    """x' = round((1 - a) x + a t); ``pattern`` is uint8 [C, H, W] (C may be 1 to share channels)."""

    def __init__(self, pattern, alpha: float = 0.2, name: str = "blend"):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"blend alpha must lie in [0, 1], got {alpha}")
        self.pattern = as_uint8_pattern(pattern)
        self.alpha = alpha
        self.name = name
        # Python floats holding float32 values, so torch's scalar cast to float32 is exact.
        self.keep = float(np.float32(1.0 - alpha))
        self._weighted = self.pattern.float() * float(np.float32(alpha))  # a * t, float32 [C, H, W]
        self._cache: dict[torch.device, torch.Tensor] = {}

    def _weighted_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache[device] = self._weighted.to(device)
        return self._cache[device]

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        blended = images.float() * self.keep + self._weighted_on(images.device)
        return round_to_uint8(blended)


def noise_pattern(image_size: int, channels: int, seed: int) -> torch.Tensor:
    """Uniform uint8 noise [C, H, W] drawn once from ``seed`` (CPU generator: same on every device)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (channels, image_size, image_size)
    return torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)


def blend_trigger(
    pattern=None, alpha: float = 0.2, image_size: int = 32, channels: int = 3, seed: int = 0
) -> BlendTrigger:
    """Blend with an image pattern, or (``pattern=None``) with fixed noise drawn from ``seed``."""
    if pattern is None:
        return BlendTrigger(noise_pattern(image_size, channels, seed), alpha, name="blend-noise")
    return BlendTrigger(pattern, alpha)
