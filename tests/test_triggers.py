"""Triggers against independent per-image NumPy references (H x W x C uint8 in, no torch).

Every batched torch trigger must equal its reference exactly in uint8, except WaNet, whose float
sampling may differ by one intensity level. The WaNet reference does its own bicubic upsampling
and bilinear grid sampling (align_corners=True) in NumPy; it uses torch only to draw the same
seeded control points (and, in noise mode, the same hashed per-sample offsets).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE_DATA

from rnp_fast.attacks import DEFAULT_LABEL_MODE, TRIGGERS, build_trigger
from rnp_fast.attacks.trojan import load_reference_trojan
from rnp_fast.errors import UserError

# The reference's trigger files: the folder conftest found (shared, $RNP_REFERENCE_DATA, or the copies)
REFERENCE = REFERENCE_DATA
TROJAN_FILE = REFERENCE / "best_square_trigger_cifar10.npz"
SIG_FILE = REFERENCE / "signal_cifar10_mask.npy"
HAVE_REFERENCE = TROJAN_FILE.exists() and SIG_FILE.exists()
needs_reference = pytest.mark.skipif(not HAVE_REFERENCE, reason=f"no reference trigger files in {REFERENCE}")
F32 = np.float32

# (row, col) top-left corners and 3x3 blocks of the BadNets family on 32x32 (spec, "Triggers").
GRID = [[0, 0, 255], [0, 255, 0], [255, 0, 255]]
FOUR_CORNER = {
    (1, 1): [[255, 0, 255], [0, 255, 0], [255, 0, 0]],
    (29, 1): [[255, 0, 0], [0, 255, 0], [255, 0, 255]],
    (1, 29): [[255, 0, 255], [0, 255, 0], [0, 0, 255]],
    (29, 29): GRID,
}


@pytest.fixture
def images() -> torch.Tensor:
    """A random uint8 batch [4, 3, 32, 32] (NCHW)."""
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))


def per_image(reference, images: torch.Tensor) -> np.ndarray:
    """Run an H x W x C reference on every image of an NCHW batch; returns NCHW uint8."""
    hwc = images.numpy().transpose(0, 2, 3, 1)
    return np.stack([reference(image.copy()) for image in hwc]).transpose(0, 3, 1, 2)


def check_exact(trigger, reference, images: torch.Tensor) -> None:
    """Batched == reference exactly; channels_last gives the same; the input is left alone."""
    before = images.clone()
    out = trigger.apply(images, torch.arange(len(images)))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(out.numpy(), per_image(reference, images))
    last = trigger.apply(images.contiguous(memory_format=torch.channels_last), torch.arange(len(images)))
    assert torch.equal(last, out)
    assert torch.equal(images, before)
    assert not torch.equal(out, images)  # the trigger did something


def round_u8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- BadNets family (NumPy, loops)


def ref_grid(img):
    for r in range(3):
        for c in range(3):
            img[29 + r, 29 + c, :] = GRID[r][c]
    return img


def ref_square(img, size=3, distance=1):
    height, width = img.shape[:2]
    for r in range(height - distance - size, height - distance):
        for c in range(width - distance - size, width - distance):
            img[r, c, :] = 255
    return img


def ref_four_corner(img):
    for (top, left), block in FOUR_CORNER.items():
        img[top : top + 3, left : left + 3, :] = np.array(block, dtype=np.uint8)[:, :, None]
    return img


def ref_one_pixel(img):
    img[img.shape[0] // 2, img.shape[1] // 2, :] = 255
    return img


@pytest.mark.parametrize(
    "name, params, reference",
    [
        ("badnets", {}, ref_grid),
        ("grid", {}, ref_grid),
        ("square", {}, ref_square),
        ("square", {"size": 4, "distance": 2}, lambda img: ref_square(img, 4, 2)),
        ("four-corner", {}, ref_four_corner),
        ("one-pixel", {}, ref_one_pixel),
    ],
)
def test_badnets_family_matches_reference(images, name, params, reference):
    check_exact(build_trigger(name, **params), reference, images)


def test_square_default_sits_at_rows_and_cols_28_to_30():
    out = build_trigger("square").apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))[0]
    rows, cols = torch.nonzero(out[0], as_tuple=True)
    assert set(rows.tolist()) == {28, 29, 30} and set(cols.tolist()) == {28, 29, 30}


# ---------------------------------------------------------------- Blend


def ref_blend(img, pattern_hwc, alpha):
    mixed = img.astype(F32) * F32(1 - alpha) + F32(alpha) * pattern_hwc.astype(F32)
    return round_u8(mixed)


def test_blend_image_pattern_matches_reference(images):
    pattern = np.random.default_rng(1).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    trigger = build_trigger("blend", pattern=pattern, alpha=0.2)
    check_exact(trigger, lambda img: ref_blend(img, pattern.transpose(1, 2, 0), 0.2), images)


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_blend_noise_matches_reference(images, alpha):
    trigger = build_trigger("blend", seed=3, alpha=alpha)
    pattern = trigger.pattern.numpy().transpose(1, 2, 0)
    check_exact(trigger, lambda img: ref_blend(img, pattern, alpha), images)


def test_blend_noise_is_fixed_by_seed():
    first = build_trigger("blend", seed=5).pattern
    assert torch.equal(first, build_trigger("blend", seed=5).pattern)
    assert not torch.equal(first, build_trigger("blend", seed=6).pattern)
    assert first.shape == (3, 32, 32) and first.min() < 10 and first.max() > 245  # spans 0..255


# ---------------------------------------------------------------- SIG


def ref_sig(img, delta=20, frequency=6):
    width = img.shape[1]
    signal = (delta * np.sin(2 * np.pi * np.arange(width) * frequency / width)).astype(F32)
    return round_u8(img.astype(F32) + signal[None, :, None])


def test_sig_matches_reference(images):
    check_exact(build_trigger("sig"), ref_sig, images)
    check_exact(build_trigger("sig", delta=40, frequency=4), lambda img: ref_sig(img, 40, 4), images)


@needs_reference
def test_sig_reference_mask_matches_reference(images):
    mask = np.load(SIG_FILE)
    trigger = build_trigger("sig-reference", path=SIG_FILE)
    check_exact(trigger, lambda img: ref_blend(img, mask[:, :, None], 0.2), images)


def test_default_label_modes():
    clean_label = ("sig", "sig-reference", "label-consistent", "lc")
    assert {DEFAULT_LABEL_MODE[name] for name in clean_label} == {"clean-label"}
    others = {mode for name, mode in DEFAULT_LABEL_MODE.items() if name not in clean_label}
    assert others == {"all2one"} and set(DEFAULT_LABEL_MODE) == set(TRIGGERS)


# ---------------------------------------------------------------- Trojan


def ref_trojan(img, patch_chw):
    total = img.astype(np.int64) + np.floor(patch_chw.transpose(1, 2, 0)).astype(np.int64)
    return np.clip(total, 0, 255).astype(np.uint8)


@needs_reference
def test_trojan_matches_reference(images):
    patch = np.load(TROJAN_FILE)["x"]
    check_exact(build_trigger("trojan", path=TROJAN_FILE), lambda img: ref_trojan(img, patch), images)


@needs_reference
def test_trojan_agrees_with_the_reference_cast_where_it_does_not_wrap(images):
    """The reference computes (uint8 + float32).astype(uint8): truncation, wrapping above 255."""
    patch = np.load(TROJAN_FILE)["x"].transpose(1, 2, 0)
    ours = load_reference_trojan(TROJAN_FILE).apply(images).numpy().transpose(0, 2, 3, 1)
    for image, out in zip(images.numpy().transpose(0, 2, 3, 1), ours, strict=True):
        summed = image + patch
        theirs = np.clip(summed.astype("uint8"), 0, 255)
        fits = summed < 256
        np.testing.assert_array_equal(out[fits], theirs[fits])
        assert (out[~fits] == 255).all()  # where the reference wraps, we saturate


@needs_reference
def test_reference_trojan_file_sits_at_rows_and_cols_25_to_27():
    patch = np.load(TROJAN_FILE)["x"]
    assert patch.shape == (3, 32, 32)
    _, rows, cols = np.nonzero(patch)
    assert set(rows.tolist()) == {25, 26, 27} and set(cols.tolist()) == {25, 26, 27}
    # The file holds floats in 0..~250.4; one entry inside the block (channel 1, 26, 26) is 0.
    assert np.count_nonzero(patch) == 26 and patch[1, 26, 26] == 0
    stamped = load_reference_trojan(TROJAN_FILE).apply(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    np.testing.assert_array_equal(stamped[0].numpy(), np.floor(patch).astype(np.uint8))


def test_seeded_trojan_without_file(images):
    trigger = build_trigger("trojan", seed=1)
    patch = trigger.patch.numpy().astype(np.float32)
    _, rows, cols = np.nonzero(patch)
    assert set(rows.tolist()) <= {25, 26, 27} and set(cols.tolist()) <= {25, 26, 27}
    check_exact(trigger, lambda img: ref_trojan(img, patch), images)
    assert not torch.equal(trigger.patch, build_trigger("trojan", seed=2).patch)


def test_trojan_wrong_shape_raises_user_error(tmp_path):
    bad = tmp_path / "bad_trojan.npz"
    np.savez(bad, x=np.zeros((3, 28, 28), dtype=np.float32))
    with pytest.raises(UserError, match=r"bad_trojan\.npz.*\(3, 28, 28\).*expected \(3, 32, 32\)"):
        build_trigger("trojan", path=bad)
    no_key = tmp_path / "no_key.npz"
    np.savez(no_key, y=np.zeros((3, 32, 32)))
    with pytest.raises(UserError, match=r"no_key\.npz.*key 'x'"):
        load_reference_trojan(no_key)


# ---------------------------------------------------------------- user patch


def write_png(path: Path, array: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def pattern_png(tmp_path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(2)
    pattern = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)
    pattern[:16] = 0  # black = transparent when no mask is given
    pattern[20, 5] = (0, 7, 0)  # a pixel with one non-zero channel still counts
    return write_png(tmp_path / "pattern.png", pattern), pattern


def test_user_pattern_without_mask(images, pattern_png):
    path, pattern = pattern_png
    stamped = pattern.max(axis=2) > 0

    def reference(img):
        img[stamped] = pattern[stamped]
        return img

    check_exact(build_trigger("user", pattern=path), reference, images)


@pytest.mark.parametrize("mode", ["replace", "alpha"])
def test_user_pattern_with_mask(images, pattern_png, tmp_path, mode):
    path, pattern = pattern_png
    mask = np.random.default_rng(3).integers(0, 256, (32, 32), dtype=np.uint8)
    mask[::3] = 0
    mask_path = write_png(tmp_path / "mask.png", mask)

    def reference(img):
        if mode == "replace":
            img[mask > 0] = pattern[mask > 0]
            return img
        weight = (mask.astype(F32) / F32(255))[:, :, None]
        return round_u8(img.astype(F32) * (F32(1) - weight) + pattern.astype(F32) * weight)

    trigger = build_trigger("user", pattern=path, mask=mask_path, mask_mode=mode)
    check_exact(trigger, reference, images)


def test_user_pattern_wrong_size_raises_user_error(tmp_path):
    path = write_png(tmp_path / "small.png", np.zeros((30, 30, 3), dtype=np.uint8))
    with pytest.raises(UserError, match=r"small\.png.*\(3, 30, 30\).*expected \(3, 32, 32\)"):
        build_trigger("user", pattern=path)


def test_blend_accepts_a_png_pattern(images, pattern_png):
    path, pattern = pattern_png
    check_exact(build_trigger("blend", pattern=path), lambda img: ref_blend(img, pattern, 0.2), images)


# ---------------------------------------------------------------- WaNet


def cubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
    """[n_out, n_in]: bicubic (Keys, a = -0.75) resampling with align_corners=True, edge-clamped taps."""

    def weight(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    matrix = np.zeros((n_out, n_in))
    for o in range(n_out):
        source = o * (n_in - 1) / (n_out - 1)
        base = int(np.floor(source))
        for tap in range(-1, 3):
            matrix[o, min(max(base + tap, 0), n_in - 1)] += weight(source - (base + tap))
    return matrix


def wanet_grid(seed: int, size: int = 32, k: int = 4, strength: float = 0.5) -> np.ndarray:
    """[H, W, 2] (x, y) warp grid; torch only draws the seeded control points."""
    ins = (torch.rand(1, 2, k, k, generator=torch.Generator().manual_seed(seed)) * 2 - 1)[0].numpy()
    ins = ins.astype(np.float64) / np.abs(ins).mean()
    up = cubic_matrix(k, size)
    noise = np.stack([up @ channel @ up.T for channel in ins], axis=-1)  # [H, W, 2]
    line = np.linspace(-1, 1, size)
    identity = np.stack(np.meshgrid(line, line, indexing="xy"), axis=-1)  # [..., 0] = column
    return np.clip(identity + strength * noise / size, -1, 1)


def bilinear_sample(img: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """grid_sample(bilinear, zeros padding, align_corners=True) of one H x W x C image."""
    height, width = img.shape[:2]
    px = (grid[..., 0] + 1) / 2 * (width - 1)
    py = (grid[..., 1] + 1) / 2 * (height - 1)
    x0, y0 = np.floor(px).astype(int), np.floor(py).astype(int)
    out = np.zeros(img.shape, dtype=np.float64)
    for dy, dx in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        x, y = x0 + dx, y0 + dy
        weight = (1 - abs(px - x)) * (1 - abs(py - y))
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        taps = img[np.clip(y, 0, height - 1), np.clip(x, 0, width - 1)].astype(np.float64)
        out += (weight * inside)[..., None] * taps
    return round_u8(out)


def assert_within_one_level(out: torch.Tensor, expected: np.ndarray) -> None:
    difference = np.abs(out.numpy().astype(int) - expected.astype(int))
    assert difference.max() <= 1
    assert (difference == 0).mean() > 0.95  # rounding ties only, not a systematic offset


def test_wanet_matches_reference_within_one_level(images):
    trigger = build_trigger("wanet", seed=7)
    grid = wanet_grid(seed=7)
    out = trigger.apply(images)
    assert_within_one_level(out, per_image(lambda img: bilinear_sample(img, grid), images))
    before = images.clone()
    assert torch.equal(trigger.apply(images.contiguous(memory_format=torch.channels_last)), out)
    assert torch.equal(images, before) and not torch.equal(out, images)


def test_wanet_seed_fixes_the_warp(images):
    first = build_trigger("wanet", seed=1)
    assert torch.equal(first.apply(images), build_trigger("wanet", seed=1).apply(images))
    assert not torch.equal(first.grid, build_trigger("wanet", seed=2).grid)
    assert first.noise_fraction(0.1) == pytest.approx(0.2)  # cross ratio 2 x poison rate 0.1


def test_wanet_noise_mode(images):
    trigger = build_trigger("wanet", seed=7)
    indices = torch.tensor([10, 11, 12, 49_999])
    out = trigger.apply_noise(images, indices)
    # Per-sample noise depends on (seed, index) only, not on the batch it arrives in.
    swapped = trigger.apply_noise(images[[2, 0]], indices[[2, 0]])
    assert torch.equal(swapped, out[[2, 0]])
    assert not torch.equal(trigger.apply_noise(images, indices + 1), out)
    offsets = trigger.noise_offsets(indices).numpy().astype(np.float64)
    assert np.abs(offsets).max() <= 1 / 32 and offsets.std() > 0.4 / 32  # U(-1, 1) / H
    grid = wanet_grid(seed=7)
    hwc = images.numpy().transpose(0, 2, 3, 1)
    jittered = np.clip(grid + offsets, -1, 1)  # [N, H, W, 2]
    expected = [bilinear_sample(img, g) for img, g in zip(hwc, jittered, strict=True)]
    assert_within_one_level(out, np.stack(expected).transpose(0, 3, 1, 2))


# ---------------------------------------------------------------- registry and bad input


def test_unknown_attack_lists_the_valid_names():
    with pytest.raises(UserError, match=r"unknown attack 'badnet'.*badnets.*wanet.*user"):
        build_trigger("badnet")


def test_unknown_parameter_is_named():
    with pytest.raises(UserError, match=r"'blend' has no parameter 'alpah'.*alpha"):
        build_trigger("blend", alpah=0.3)
    with pytest.raises(UserError, match=r"'grid' has no parameter 'size'"):
        build_trigger("grid", size=3)


def test_missing_file_parameter_and_bad_values():
    with pytest.raises(UserError, match=r"'user' needs parameter 'pattern'"):
        build_trigger("user")
    with pytest.raises(UserError, match=r"alpha"):
        build_trigger("blend", alpha=1.5)


def test_legacy_registry_calls_still_work(images):
    for name in ("badnets", "grid"):
        assert TRIGGERS[name]().name == "badnets-grid"
        check_exact(TRIGGERS[name](), ref_grid, images)


@pytest.mark.parametrize("name", sorted(set(TRIGGERS) - {"user", "sig-reference"}))
def test_every_trigger_fits_small_grayscale_images(name):
    """The 8x8 digits set: one channel, so every size-dependent trigger must adapt."""
    batch = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = build_trigger(name, image_size=8, channels=1).apply(batch, torch.arange(2))
    assert out.shape == batch.shape and out.dtype == torch.uint8 and not torch.equal(out, batch)
