"""CIFAR-100 from a local ``cifar-100-python`` directory (the official python-pickle release).

The release holds two pickles, ``train`` (50,000 images) and ``test`` (10,000), in the same row
format as CIFAR-10's batches; we use the 100 fine labels. Unpickling goes through the same
restricted unpickler as CIFAR-10, so a tampered file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.loaders.sources import DataSource, ImageSet, read_cifar_batch

# The usual CIFAR-100 normalisation (per-channel statistics of the training set).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
LAYOUT = "a 'cifar-100-python' directory (files train, test)"


def find_cifar100_dir(data_dir: str | None) -> Path | None:
    """The ``cifar-100-python`` directory at or directly under ``data_dir``, if any."""
    if not data_dir:
        return None
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "cifar-100-python"):
        if (candidate / "train").is_file() or (candidate / "test").is_file():
            return candidate
    return None


def cifar100_source(data_dir: str | None) -> DataSource:
    folder = find_cifar100_dir(data_dir)
    if folder is None:
        where = f"in {data_dir!r}" if data_dir else "(no --data-dir given)"
        raise UserError(f"CIFAR-100 not found {where}: pass --data-dir pointing at {LAYOUT}")

    def read(split: str) -> ImageSet:
        return ImageSet(*read_cifar_batch(folder / split, 100, b"fine_labels", "CIFAR-100"))

    return DataSource("cifar100", read("train"), read("test"), 100, CIFAR100_MEAN, CIFAR100_STD)
