"""BadNets triggers (Gu et al. 2017): fixed pixel patches stamped into the image.

Each trigger is a list of (row, col, pattern rows) stamps applied to every channel; the patterns
are the reference implementation's (see RNP_SPEC.md, "Triggers"). Negative offsets count from the
bottom-right corner, so the same trigger fits any image size (rows 29..31 on 32x32 are ``-3``).
"""

from __future__ import annotations

import torch

from rnp_fast.attacks.base import Trigger

# Row 29 first: the reference's "grid" trigger in the bottom-right 3x3 block.
GRID = ((0, 0, 255), (0, 255, 0), (255, 0, 255))
# The other three corners of the "four corner" trigger (rows top to bottom).
TOP_LEFT = ((255, 0, 255), (0, 255, 0), (255, 0, 0))
BOTTOM_LEFT = ((255, 0, 0), (0, 255, 0), (255, 0, 255))
TOP_RIGHT = ((255, 0, 255), (0, 255, 0), (0, 0, 255))
FOUR_CORNER = ((1, 1, TOP_LEFT), (-3, 1, BOTTOM_LEFT), (1, -3, TOP_RIGHT), (-3, -3, GRID))


class PatchTrigger(Trigger):
    """Overwrites fixed pixel blocks: ``stamps`` is a list of (top, left, pattern rows)."""

    def __init__(self, stamps, name: str):
        self.stamps = [(top, left, torch.tensor(rows, dtype=torch.uint8)) for top, left, rows in stamps]
        self.name = name

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        out = images.clone()
        height, width = images.shape[-2:]
        for top, left, pattern in self.stamps:
            rows, cols = pattern.shape
            # Negative offsets count from the bottom-right corner, as the spec's rows 29..31 do on 32x32.
            top_ = top % height
            left_ = left % width
            out[..., top_ : top_ + rows, left_ : left_ + cols] = pattern.to(images.device)
        return out


class CentrePixelTrigger(Trigger):
    """Sets pixel (H // 2, W // 2) to ``value`` in every channel; the centre depends on the size."""

    def __init__(self, value: int = 255, name: str = "badnets-one-pixel"):
        self.value = value
        self.name = name

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        out = images.clone()
        height, width = images.shape[-2:]
        out[..., height // 2, width // 2] = self.value
        return out


def grid_trigger() -> PatchTrigger:
    """The reference default: rows/cols 29..31 of a 32x32 image (the last three)."""
    return PatchTrigger([(-3, -3, GRID)], name="badnets-grid")


def square_trigger(size: int = 3, distance: int = 1) -> PatchTrigger:
    """A solid ``size`` x ``size`` block of 255, ``distance`` pixels from the bottom-right corner.

    Rows and columns H - distance - size .. H - distance - 1: 28..30 on 32x32 with the defaults.
    """
    if size < 1 or distance < 0:
        raise ValueError(f"square trigger needs size >= 1 and distance >= 0, got {size=}, {distance=}")
    block = ((255,) * size,) * size
    offset = -(distance + size)
    return PatchTrigger([(offset, offset, block)], name="badnets-square")


def four_corner_trigger() -> PatchTrigger:
    """The grid block at rows/cols 29..31 plus three mirrored 3x3 blocks (spec, "four corner").

    The top and left blocks sit one pixel in (rows/cols 1..3), the bottom and right ones are flush
    with the edge (29..31), exactly as the reference stamps them.
    """
    return PatchTrigger(FOUR_CORNER, name="badnets-four-corner")


def one_pixel_trigger() -> CentrePixelTrigger:
    """The centre pixel (row 16, column 16 on 32x32) set to 255 in all channels."""
    return CentrePixelTrigger()
