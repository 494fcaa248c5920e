"""Any ImageFolder-style directory: one sub-folder per class, for a train and a test split.

    <data-dir>/train/<class>/*.png|jpg|jpeg|ppm|bmp|webp|tif
    <data-dir>/test/<class>/...        (or val/)

Classes are the train split's sub-folders in sorted order (torchvision's ImageFolder convention),
so label i means the same class here and in a model trained with torchvision. The test split may
lack some classes but may not add new ones. Images are decoded to RGB and resized to ``size``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnp_fast.errors import UserError
from rnp_fast.loaders.decode import IMAGE_SUFFIXES, is_image_file, read_images
from rnp_fast.loaders.sources import DataSource, ImageSet, channel_statistics, dataset_root

LAYOUT = "a directory with train/<class>/ and test/<class>/ (or val/<class>/) image folders"


def image_folder_source(data_dir: str | None, size: int = 32) -> DataSource:
    root = dataset_root(data_dir, "imagefolder", LAYOUT)
    train_dir = root / "train"
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise UserError(f"{root} is not an ImageFolder dataset: expected {LAYOUT}")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise UserError(f"{train_dir} needs at least two class folders, found {len(classes)}")
    train = read_split(train_dir, classes, size, every_class=True)
    test = read_split(test_dir, classes, size, every_class=False)
    mean, std = channel_statistics(train.images)
    return DataSource(f"imagefolder:{root.name}", train, test, len(classes), mean, std)


def read_split(folder: Path, classes: list[str], size: int, every_class: bool) -> ImageSet:
    """The images of one split; ``every_class`` demands a non-empty folder for every class."""
    extra = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise UserError(f"{folder / extra[0]}: class {extra[0]!r} is not among the train split's classes")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        files = sorted(p for p in class_dir.iterdir() if is_image_file(p)) if class_dir.is_dir() else []
        if every_class and not files:
            raise UserError(f"class folder {class_dir} has no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise UserError(f"{folder} holds no images in its class folders")
    return ImageSet(read_images(paths, size), torch.tensor(labels, dtype=torch.int64))
