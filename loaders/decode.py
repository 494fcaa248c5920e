"""Image files -> uint8 ``[N, C, H, W]`` tensors of one fixed size, with Pillow.

Every directory dataset (GTSRB, Tiny-ImageNet, ImageFolder) decodes through here, so they all
resize the same way: Pillow's bilinear filter, which averages over the whole footprint when it
shrinks (the antialiased resize torchvision's ``Resize`` applies to PIL images). Images already at
the target size are not resampled, so a 64x64 Tiny-ImageNet file is read bit for bit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rnp_fast.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: Path, size: int) -> np.ndarray:
    """uint8 [3, size, size] RGB from any image file Pillow reads (grayscale becomes 3 channels)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image file missing: {path}") from None
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"cannot decode image {path}: {error}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1)


def read_images(paths: list[Path], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size] in the order of ``paths``.

    Decoding is spread over threads: Pillow releases the GIL while it decodes and resizes.
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def fill(item: tuple[int, Path]) -> None:
        out[item[0]] = read_image(item[1], size)

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fill, enumerate(paths)))  # list() re-raises the first worker's error
    return torch.from_numpy(out)


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a small text file (an annotation or class list), as a UserError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    return [line for line in text.splitlines() if line.strip()]
