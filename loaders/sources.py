"""Dataset sources: whole datasets as uint8 tensors ``[N, C, H, W]`` plus int64 labels.

Every loader (device-resident, reference-mode DataLoader, FFCV) reads a `DataSource`, so a dataset
is defined once. Nothing here needs torchvision or the network: CIFAR-10 is read from a local
``cifar-10-batches-py`` directory, and the embedded dataset is scikit-learn's digits set.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnp_fast.errors import UserError

# The reference's CIFAR-10 normalisation (RNP_SPEC.md, "Models").
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass
class ImageSet:
    """images: uint8 [N, C, H, W]; labels: int64 [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass
class DataSource:
    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def load_source(
    name: str, data_dir: str | None = None, download: bool = False, image_size: int | None = None
) -> DataSource:
    """Load a dataset by name (see ``DATASETS``); ``image_size`` resizes the directory datasets.

    ``digits`` is embedded; the others are read from ``data_dir``. The pickle datasets are 32x32 by
    construction, so ``image_size`` may only restate that; the directory datasets (GTSRB,
    Tiny-ImageNet, ImageFolder) are decoded and resized to it (default: ``NATIVE_SIZE``).
    """
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if name in FIXED_SIZE and image_size not in (None, 32):
        raise UserError(
            f"--image-size {image_size}: {name} images are 32x32 (resizing is for {', '.join(NATIVE_SIZE)})"
        )
    if name == "digits":
        return digits_source()
    if name == "cifar10":
        return cifar10_source(data_dir, download)
    if name == "synthetic-cifar10":
        from rnp_fast.loaders.synthetic_cifar10 import synthetic_cifar10_source

        return synthetic_cifar10_source()
    if name == "cifar100":
        from rnp_fast.loaders.cifar100 import cifar100_source

        return cifar100_source(data_dir)
    size = image_size or NATIVE_SIZE[name]
    if name == "gtsrb":
        from rnp_fast.loaders.gtsrb import gtsrb_source

        return gtsrb_source(data_dir, size)
    if name == "tiny-imagenet":
        from rnp_fast.loaders.tiny_imagenet import tiny_imagenet_source

        return tiny_imagenet_source(data_dir, size)
    from rnp_fast.loaders.image_folder import image_folder_source

    return image_folder_source(data_dir, size)


FIXED_SIZE = ("digits", "cifar10", "cifar100", "synthetic-cifar10")
# Directory datasets and the size their images are decoded to without --image-size.
NATIVE_SIZE = {"gtsrb": 32, "tiny-imagenet": 64, "imagefolder": 32}
DATASETS = (*FIXED_SIZE, *NATIVE_SIZE)


def dataset_root(data_dir: str | None, dataset: str, layout: str) -> Path:
    """``data_dir`` as an existing directory, or a one-line UserError saying what was expected."""
    if not data_dir:
        raise UserError(f"--dataset {dataset} needs --data-dir pointing at {layout}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"--data-dir {data_dir!r} is not a directory (expected {layout})")
    return root


def digits_source(test_fraction: float = 1 / 3) -> DataSource:
    """scikit-learn's 1,797 8x8 handwritten digits as 32x32 RGB images.

    Intensities 0..16 map to 0..255; each pixel becomes a 4x4 block (nearest upscaling) and is
    copied to three channels. The train/test split is stratified and fixed (random_state=0), so
    every run and every machine sees the same split (1,198 train, 599 test).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [N, 8, 8]
    pixels = pixels.repeat(4, axis=1).repeat(4, axis=2)  # [N, 32, 32]
    images = np.repeat(pixels[:, None], 3, axis=1)  # [N, 3, 32, 32]
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=0
    )
    train = ImageSet(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]))
    test = ImageSet(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    mean, std = channel_statistics(train.images)
    return DataSource("digits", train, test, 10, mean, std)


def channel_statistics(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale (for normalisation)."""
    scaled = images.double().div(255.0)
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3))
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def find_cifar10_dir(data_dir: str | None) -> Path | None:
    """The ``cifar-10-batches-py`` directory at or directly under ``data_dir``, if any."""
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file():
            return candidate
    return None


def cifar10_source(data_dir: str | None, download: bool = False) -> DataSource:
    """CIFAR-10 from a local python-pickle directory (or torchvision's download, if asked)."""
    batches = find_cifar10_dir(data_dir)
    if batches is None and download:
        batches = download_cifar10(data_dir)
    if batches is None:
        where = f"in {data_dir!r}" if data_dir else "(no --data-dir given)"
        raise UserError(
            f"CIFAR-10 not found {where}: pass --data-dir pointing at a 'cifar-10-batches-py' directory "
            "(data_batch_1..5, test_batch), or add --download where torchvision and the internet are available"
        )
    train_parts = [read_cifar_batch(batches / f"data_batch_{i}") for i in range(1, 6)]
    train = ImageSet(torch.cat([images for images, _ in train_parts]), torch.cat([labels for _, labels in train_parts]))
    test = ImageSet(*read_cifar_batch(batches / "test_batch"))
    return DataSource("cifar10", train, test, 10, CIFAR10_MEAN, CIFAR10_STD)


def read_cifar_batch(
    path: Path, num_classes: int = 10, label_key: bytes = b"labels", name: str = "CIFAR-10"
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CIFAR pickle batch: rows of 3,072 bytes (1,024 red, then green, then blue).

    CIFAR-10 stores its labels under ``b"labels"``, CIFAR-100 under ``b"fine_labels"``.
    """
    if not path.is_file():
        raise UserError(f"{name} file missing: {path}")
    try:
        with open(path, "rb") as handle:
            # These files are plain pickles of dicts of arrays (the dataset's official format).
            # Restrict unpickling to numpy arrays and builtins so a tampered file cannot run code.
            batch = RestrictedUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    except Exception as error:  # any malformed content is the user's file, reported in one line
        raise UserError(f"cannot read {name} batch {path}: {type(error).__name__}: {error}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or not len(labels):
        raise UserError(f"malformed {name} batch {path}: data shape {data.shape}, {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"malformed {name} batch {path}: labels outside 0..{num_classes - 1}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "list"),
        ("builtins", "dict"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def download_cifar10(data_dir: str | None) -> Path | None:
    """Fetch CIFAR-10 through torchvision (needs torchvision and the internet)."""
    try:
        from torchvision.datasets import CIFAR10
    except Exception as error:
        raise UserError(f"--download needs torchvision, which does not import here ({error})") from None
    root = data_dir or "data"
    try:
        CIFAR10(root, train=True, download=True)
    except Exception as error:
        raise UserError(f"CIFAR-10 download failed: {error}") from None
    return find_cifar10_dir(root)
