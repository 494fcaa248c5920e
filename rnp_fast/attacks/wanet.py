"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warp, x' = grid_sample(x, grid).

The warp field is drawn once from the attack's seed, as in the WaNet code:
    ins ~ U(-1, 1) [1, 2, k, k];  ins /= mean|ins|
    noise = bicubic upsample of ins to H x W (align_corners=True), permuted to [1, H, W, 2]
    grid = clamp((identity + s * noise / H) * grid_rescale, -1, 1)
with ``identity`` the [-1, 1] pixel-centre grid in grid_sample's (x = column, y = row) order.
Sampling is bilinear with align_corners=True on float32 pixel values, then rounded to uint8.

Noise mode (WaNet's "cross" samples, which keep their TRUE labels so the network learns that only
the exact warp is the trigger): grid + U(-1, 1) / H per pixel and sample, clamped to [-1, 1]. The
offsets are a stateless hash of (seed, dataset index, element), computed with int64 tensor ops on
the batch's device: a sample always gets the same noise, whatever batch it lands in.
The noise-mode share of the training set is ``noise_rate`` when given, else cross_ratio x the
poisoning rate (2 x 0.1 = 0.2 with the paper's values); `training_plan` draws those samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnp_fast.attacks.base import Trigger
from rnp_fast.attacks.blend import round_to_uint8

CROSS_RATIO = 2.0  # WaNet: noise-mode samples per poisoned sample
_MASK32 = 0xFFFFFFFF
_NOISE_STREAM = 0x57A9E7  # keeps noise-mode keys apart from other uses of the same seed


def cross_noise_rate(poison_rate: float, cross_ratio: float = CROSS_RATIO) -> float:
    """Fraction of the training set used in noise mode for a given poisoning rate."""
    return cross_ratio * poison_rate


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser on int64 values in [0, 2^32).

    Xorshift-multiply rounds; both multipliers are odd (a bijection mod 2^32) and below 2^31, so the
    int64 products stay below 2^63 and never overflow on any device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x68E31DA5) & _MASK32
    return x ^ (x >> 16)


def hashed_uniform(seed: int, indices: torch.Tensor, count: int) -> torch.Tensor:
    """float32 [N, count] in [-1, 1), a pure function of (seed, indices[n], element)."""
    folded = (seed ^ (seed >> 32) ^ _NOISE_STREAM) & _MASK32  # seeds above 2^32 stay distinct
    seed_key = _mix32(torch.tensor(folded, device=indices.device))
    sample_key = _mix32((indices.to(torch.int64) + seed_key) & _MASK32)  # [N]
    elements = _mix32(torch.arange(count, device=indices.device, dtype=torch.int64))  # [count]
    # Adding the key after the xor keeps samples from sharing a permutation of one value set.
    bits = _mix32(((sample_key[:, None] ^ elements[None, :]) + sample_key[:, None]) & _MASK32)
    # The top 24 bits make a float32 in [0, 1) exactly.
    return (bits >> 8).to(torch.float32) * (2.0 / 2**24) - 1.0


def identity_grid(size: int) -> torch.Tensor:
    """float32 [1, H, W, 2]: grid_sample's identity, last dim (x = column, y = row)."""
    line = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    return torch.stack((cols, rows), dim=-1)[None]


def warp_field(size: int, k: int, seed: int) -> torch.Tensor:
    """float32 [1, H, W, 2]: the normalised random control points, bicubically upsampled."""
    generator = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(size, size), mode="bicubic", align_corners=True)
    return noise.permute(0, 2, 3, 1)


class WaNetTrigger(Trigger):
    """Warps every image with one seeded field; ``apply_noise`` adds per-sample jitter on top."""

    def __init__(
        self,
        image_size: int = 32,
        seed: int = 0,
        k: int = 4,
        strength: float = 0.5,
        grid_rescale: float = 1.0,
        noise_rate: float | None = None,
        cross_ratio: float = CROSS_RATIO,
        name: str = "wanet",
    ):
        if k < 2 or image_size < 2:
            raise ValueError(f"wanet needs k >= 2 and image_size >= 2, got {k=}, {image_size=}")
        if noise_rate is not None and not 0.0 <= noise_rate <= 1.0:
            raise ValueError(f"wanet noise_rate must lie in [0, 1], got {noise_rate}")
        if cross_ratio < 0:
            raise ValueError(f"wanet cross_ratio must be >= 0, got {cross_ratio}")
        self.image_size, self.seed, self.k = image_size, seed, k
        self.strength, self.grid_rescale = strength, grid_rescale
        self.noise_rate, self.cross_ratio = noise_rate, cross_ratio
        self.name = name
        self.noise = warp_field(image_size, k, seed)
        warped = (identity_grid(image_size) + strength * self.noise / image_size) * grid_rescale
        self.grid = warped.clamp(-1, 1)  # [1, H, W, 2]
        self._cache: dict[torch.device, torch.Tensor] = {}

    def noise_fraction(self, poison_rate: float) -> float:
        """Share of the training set shown in noise mode (at most 1)."""
        rate = self.noise_rate if self.noise_rate is not None else cross_noise_rate(poison_rate, self.cross_ratio)
        return min(1.0, rate)

    def _grid_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._cache:
            self._cache[device] = self.grid.to(device)
        return self._cache[device]

    def _check(self, images: torch.Tensor) -> None:
        if images.shape[-2:] != (self.image_size, self.image_size):
            size = self.image_size
            raise ValueError(f"wanet was built for {size}x{size} images, got {tuple(images.shape)}")

    def noise_offsets(self, indices: torch.Tensor) -> torch.Tensor:
        """float32 [N, H, W, 2]: the noise-mode offsets U(-1, 1) / H for dataset ``indices``."""
        size = self.image_size
        return hashed_uniform(self.seed, indices, size * size * 2).view(-1, size, size, 2) / size

    def noise_grid(self, indices: torch.Tensor) -> torch.Tensor:
        """float32 [N, H, W, 2]: the warp grid plus per-sample jitter, clamped to [-1, 1]."""
        return (self._grid_on(indices.device) + self.noise_offsets(indices)).clamp(-1, 1)

    def _sample(self, images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        # The grid stays inside [-1, 1], so the zero padding is never read.
        warped = F.grid_sample(images.float(), grid, "bilinear", padding_mode="zeros", align_corners=True)
        return round_to_uint8(warped)

    def apply(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        self._check(images)
        grid = self._grid_on(images.device).expand(images.shape[0], -1, -1, -1)
        return self._sample(images, grid)

    def apply_noise(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Noise-mode images (they keep their true labels); ``indices`` are dataset indices [N]."""
        self._check(images)
        if indices is None or indices.shape != images.shape[:1]:
            raise ValueError("wanet noise mode needs one dataset index per image")
        return self._sample(images, self.noise_grid(indices.to(images.device)))
