"""Tiny-ImageNet (200 classes, 64x64) from the ``tiny-imagenet-200`` release layout.

    tiny-imagenet-200/wnids.txt                       one WordNet id per line (200)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG      500 per class
    tiny-imagenet-200/val/images/*.JPEG               10,000
    tiny-imagenet-200/val/val_annotations.txt         file <TAB> wnid <TAB> box (4 numbers)

The official test split has no labels, so the validation split is the test set (as every backdoor
toolkit does). Class indices follow the sorted WordNet ids, the order torchvision's ImageFolder
gives the train folder, so checkpoints trained elsewhere keep their label meaning. A few files are
grayscale; they are decoded to RGB.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnp_fast.errors import UserError
from rnp_fast.loaders.decode import is_image_file, read_images, read_lines
from rnp_fast.loaders.sources import DataSource, ImageSet, channel_statistics, dataset_root

LAYOUT = "a 'tiny-imagenet-200' directory (wnids.txt, train/<wnid>/images/, val/val_annotations.txt)"


def tiny_imagenet_source(data_dir: str | None, size: int = 64) -> DataSource:
    base = find_base(dataset_root(data_dir, "tiny-imagenet", LAYOUT))
    wnids = class_ids(base)
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train_paths, train_labels = train_split(base / "train", wnids)
    test_paths, test_labels = val_split(base / "val", index)
    train = ImageSet(read_images(train_paths, size), torch.tensor(train_labels))
    test = ImageSet(read_images(test_paths, size), torch.tensor(test_labels))
    mean, std = channel_statistics(train.images)
    return DataSource("tiny-imagenet", train, test, len(wnids), mean, std)


def find_base(root: Path) -> Path:
    for candidate in (root, root / "tiny-imagenet-200"):
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise UserError(f"Tiny-ImageNet not found in {str(root)!r}: expected {LAYOUT}")


def class_ids(base: Path) -> list[str]:
    """Sorted WordNet ids: from wnids.txt when present, else the train folder's subfolders."""
    listing = base / "wnids.txt"
    if listing.is_file():
        wnids = sorted({line.strip() for line in read_lines(listing)})
    else:
        wnids = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if not wnids:
        raise UserError(f"Tiny-ImageNet in {base} lists no classes (wnids.txt and train/ are empty)")
    return wnids


def train_split(train: Path, wnids: list[str]) -> tuple[list[Path], list[int]]:
    paths: list[Path] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = train / wnid / "images"
        if not folder.is_dir():
            raise UserError(f"Tiny-ImageNet class {wnid} has no training folder {folder}")
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not files:
            raise UserError(f"Tiny-ImageNet training folder {folder} has no images")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def val_split(val: Path, index: dict[str, int]) -> tuple[list[Path], list[int]]:
    """Validation images and labels from val_annotations.txt (tab-separated: file, wnid, box)."""
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise UserError(f"Tiny-ImageNet validation labels missing: {annotations}")
    paths: list[Path] = []
    labels: list[int] = []
    for number, line in enumerate(read_lines(annotations), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise UserError(
                f"{annotations}, line {number}: expected 'file<TAB>wnid<TAB>box' with a known wnid, got {line!r}"
            )
        paths.append(val / "images" / fields[0])
        labels.append(index[fields[1]])
    if not paths:
        raise UserError(f"Tiny-ImageNet validation labels file {annotations} is empty")
    return paths, labels
