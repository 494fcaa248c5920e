"""A trigger the user draws: a PNG pattern, optionally with a PNG mask.

- No mask: pixels where any channel of the pattern is non-zero are replaced (black = transparent),
  as the reference does with its PNG trojan patterns.
- ``mask_mode="replace"``: pixels where the mask is > 0 are replaced by the pattern.
- ``mask_mode="alpha"``: x' = round(x * (1 - m) + t * m) with m = mask / 255, float32, rounded half
  to even (same arithmetic contract as Blend, so a NumPy reference reproduces it exactly).
A colour mask is reduced to one channel by its maximum over R, G, B (alpha is ignored).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rnp_fast.attacks.base import Trigger
from rnp_fast.attacks.blend import round_to_uint8
from rnp_fast.errors import UserError

MASK_MODES = ("replace", "alpha")


def load_png(path: str | Path, channels: int, image_size: int, what: str = "pattern") -> np.ndarray:
    """uint8 [C, H, W] from a PNG (any PNG mode), checked against the dataset's image size."""
    from PIL import Image  # Pillow ships with matplotlib, a dependency

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except OSError as error:
        raise UserError(f"{path}: cannot read the trigger {what} PNG ({error})") from error
    array = array.reshape(*array.shape[:2], -1).transpose(2, 0, 1)  # [C, H, W]
    expected = (channels, image_size, image_size)
    if array.shape != expected:
        raise UserError(f"{path}: trigger {what} has shape {array.shape} (C, H, W), expected {expected}")
    return np.ascontiguousarray(array)


class UserPatchTrigger(Trigger):
    """pattern: uint8 [C, H, W]; mask: uint8 [H, W] (mask_mode decides how it is read)."""

    def __init__(self, pattern: torch.Tensor, mask: torch.Tensor, mask_mode: str = "replace", name="user"):
        if mask_mode not in MASK_MODES:
            raise ValueError(f"unknown mask_mode {mask_mode!r}; choose one of {', '.join(MASK_MODES)}")
        self.pattern, self.mask, self.mask_mode, self.name = pattern, mask, mask_mode, name
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _operands(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """replace: (pattern uint8, mask bool); alpha: (m * t float32, 1 - m float32)."""
        if device not in self._cache:
            if self.mask_mode == "replace":
                operands = (self.pattern, self.mask > 0)
            else:
                weight = self.mask.float() / 255.0
                operands = (self.pattern.float() * weight, 1.0 - weight)
            self._cache[device] = tuple(t.to(device) for t in operands)
        return self._cache[device]

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        first, second = self._operands(images.device)
        if self.mask_mode == "replace":
            return torch.where(second, first, images)
        return round_to_uint8(images.float() * second + first)


def user_trigger(
    pattern: str | Path,
    mask: str | Path | None = None,
    mask_mode: str = "replace",
    image_size: int = 32,
    channels: int = 3,
) -> UserPatchTrigger:
    """Build the trigger from PNG files; without a mask, the pattern's non-black pixels are stamped."""
    stamp = torch.from_numpy(load_png(pattern, channels, image_size))
    if mask is None:
        weights = stamp.amax(dim=0).gt(0).to(torch.uint8) * 255
    else:
        weights = torch.from_numpy(load_png(mask, 3, image_size, what="mask")).amax(dim=0)
    return UserPatchTrigger(stamp, weights, mask_mode, name="user")
