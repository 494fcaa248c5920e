"""GTSRB (German Traffic Sign Recognition Benchmark) from its official directory layout.

    <data-dir>[/GTSRB]/Final_Training/Images/<class>/GT-<class>.csv and *.ppm   (class = 00000..00042)
    <data-dir>[/GTSRB]/Final_Test/Images/*.ppm
    GT-final_test.csv (from GTSRB_Final_Test_GT.zip) in Final_Test/Images, Final_Test or the root

The GT files are ``;``-separated with ``Filename`` and ``ClassId`` columns. A training class folder
without its GT file is read by listing its images (its class is the folder name). Images vary from
15x15 to 250x250 pixels and are resized whole (the ROI columns are ignored, as BackdoorBench does)
to ``size`` x ``size``. Normalisation statistics are those of the decoded training set.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from rnp_fast.errors import UserError
from rnp_fast.loaders.decode import is_image_file, read_images
from rnp_fast.loaders.sources import DataSource, ImageSet, channel_statistics, dataset_root

LAYOUT = "a GTSRB directory (Final_Training/Images/<class>/..., Final_Test/Images/... and GT-final_test.csv)"
TEST_GT = "GT-final_test.csv"


def gtsrb_source(data_dir: str | None, size: int = 32) -> DataSource:
    base = find_base(dataset_root(data_dir, "gtsrb", LAYOUT))
    train_paths, train_labels = train_split(base / "Final_Training" / "Images")
    num_classes = max(train_labels) + 1
    test_paths, test_labels = test_split(base / "Final_Test")
    if max(test_labels) >= num_classes:
        raise UserError(f"GTSRB test labels go up to {max(test_labels)} but the training set has {num_classes} classes")
    train = ImageSet(read_images(train_paths, size), torch.tensor(train_labels))
    test = ImageSet(read_images(test_paths, size), torch.tensor(test_labels))
    mean, std = channel_statistics(train.images)
    return DataSource("gtsrb", train, test, num_classes, mean, std)


def find_base(root: Path) -> Path:
    for candidate in (root, root / "GTSRB"):
        if (candidate / "Final_Training" / "Images").is_dir():
            return candidate
    raise UserError(f"GTSRB not found in {str(root)!r}: no Final_Training/Images directory (expected {LAYOUT})")


def read_gt(path: Path) -> list[tuple[str, int]]:
    """(Filename, ClassId) rows of a ``;``-separated GT file, checked for both columns."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle, delimiter=";"))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read GTSRB annotation file {path}: {error}") from None
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise UserError(f"malformed GTSRB annotation file {path}: needs ';'-separated Filename and ClassId columns")
    try:
        pairs = [(row["Filename"], int(row["ClassId"])) for row in rows]
    except (TypeError, ValueError):
        pairs = [("", -1)]
    if any(class_id < 0 or not name for name, class_id in pairs):
        raise UserError(f"malformed GTSRB annotation file {path}: every row needs a Filename and a ClassId >= 0")
    return pairs


def train_split(images: Path) -> tuple[list[Path], list[int]]:
    """Every training image and its class, class folder by class folder."""
    folders = sorted(p for p in images.iterdir() if p.is_dir())
    if not folders:
        raise UserError(f"GTSRB training directory {images} has no class folders")
    paths: list[Path] = []
    labels: list[int] = []
    for folder in folders:
        if not folder.name.isdigit():
            raise UserError(f"GTSRB class folder {folder} is not named by its class number (00000..00042)")
        label = int(folder.name)
        files = class_files(folder, label)
        paths += files
        labels += [label] * len(files)
    return paths, labels


def class_files(folder: Path, label: int) -> list[Path]:
    gt = folder / f"GT-{folder.name}.csv"
    if not gt.is_file():
        files = sorted(p for p in folder.iterdir() if is_image_file(p))
        if not files:
            raise UserError(f"GTSRB class folder {folder} has no images")
        return files
    rows = read_gt(gt)
    wrong = [name for name, class_id in rows if class_id != label]
    if wrong:
        raise UserError(f"{gt}: {wrong[0]} is labelled with another class than its folder {folder.name}")
    return [folder / name for name, _ in rows]


def test_split(final_test: Path) -> tuple[list[Path], list[int]]:
    """Test images and labels from GT-final_test.csv (which ships apart from the test images)."""
    images = final_test / "Images"
    candidates = (images / TEST_GT, final_test / TEST_GT, final_test.parent / TEST_GT)
    gt = next((p for p in candidates if p.is_file()), None)
    if gt is None:
        raise UserError(
            f"GTSRB test labels not found: put {TEST_GT} (from GTSRB_Final_Test_GT.zip) in {images} or {final_test}"
        )
    rows = read_gt(gt)
    return [images / name for name, _ in rows], [label for _, label in rows]
