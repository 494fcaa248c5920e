"""FFCV ``.beton`` files of a dataset split: writing (``rnp-fast convert``) and checked opening.

A file holds, per sample in the source's order, ``image``: the uint8 ``[C, H, W]`` array stored
raw (an NDArrayField, so a round trip is exact: no JPEG) and ``label``: an IntField. FFCV keeps
scalar fields inside the metadata table, so the labels of a whole file are read without touching
the images (the poisoning plan needs them before the first batch).

FFCV is an optional extra: this module imports without it, and every entry point says how to
install it when it is missing.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnp_fast.errors import UserError
from rnp_fast.loaders.sources import ImageSet

IMAGE, LABEL = "image", "label"
INSTALL_HINT = (
    "pip install 'rnp-fast[ffcv]' (it builds against libturbojpeg, OpenCV and pkg-config: see `make install-ffcv`)"
)


@contextmanager
def torch_threads_kept():
    """Restore torch's intra-op thread count after FFCV changed it: FFCV sets it when imported (to
    1) and when a loader is built or iterated (to its worker count), which would change the
    caller's training speed and, through the float order, its results."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def require_ffcv():
    """The ``ffcv`` module, or a UserError that says how to install it."""
    try:
        import numba

        # FFCV's parallel code runs on numba, which prefers TBB when libtbb is present (OpenCV's
        # Debian packages bring it). After FFCV's writer has forked, TBB's pool deadlocks at
        # interpreter exit; OpenMP does not. numba starts its threads while ffcv is imported, so
        # the preference must be set before that import.
        if numba.config.THREADING_LAYER == "default":
            numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
        with torch_threads_kept():  # importing ffcv sets torch's intra-op threads to 1
            import ffcv
    except ImportError as error:
        raise UserError(f"FFCV is not installed ({error}): {INSTALL_HINT}") from None
    return ffcv


class _Samples:
    """FFCV's writer reads ``dataset[i] -> (image, label)``, one tuple per field, in field order."""

    def __init__(self, data: ImageSet):
        self.images = data.images.numpy()
        self.labels = data.labels.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def write_beton(data: ImageSet, path: str | Path, num_workers: int = 1) -> Path:
    """Write ``data`` to ``path`` (atomically: a partial file never takes the final name)."""
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")
    if len(data) == 0:
        raise UserError(f"cannot write {path}: the split has no images")
    fields = {IMAGE: NDArrayField(np.dtype("uint8"), tuple(data.images.shape[1:])), LABEL: IntField()}
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        DatasetWriter(str(staging), fields, num_workers=num_workers).from_indexed_dataset(_Samples(data))
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


@dataclass
class BetonInfo:
    """What a checked ``.beton`` holds: labels int64 [N] (from the metadata) and the image shape."""

    path: Path
    labels: np.ndarray
    image_shape: tuple[int, int, int]

    def __len__(self) -> int:
        return len(self.labels)


def open_beton(path: str | Path) -> BetonInfo:
    """Read and check a ``.beton``'s header, fields and allocation; a UserError if unusable.

    FFCV memory-maps the data region, so a truncated file would fail deep inside a worker (or with
    SIGBUS). Every image's extent is therefore checked against the file size up front.
    """
    require_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.reader import Reader

    path = Path(path)
    if not path.is_file():
        raise UserError(f".beton file not found: {path}")
    try:
        reader = Reader(str(path))
    except Exception as error:  # any malformed header or table: the user's file, one line
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        raise UserError(f"cannot read .beton file {path}: not a complete FFCV file, truncated? ({reason})") from None
    handlers = reader.handlers
    image, label = handlers.get(IMAGE), handlers.get(LABEL)
    if not isinstance(image, NDArrayField) or not isinstance(label, IntField):
        raise UserError(f"{path}: expected an FFCV file written by `rnp-fast convert` (fields image, label)")
    shape = tuple(int(s) for s in image.shape)
    if image.dtype != np.uint8 or len(shape) != 3:
        raise UserError(f"{path}: images must be uint8 [C, H, W], found {image.dtype} {shape}")
    names = list(handlers)
    pointers = reader.metadata[f"f{names.index(IMAGE)}"].astype(np.int64)
    if reader.num_samples == 0 or pointers.size != reader.num_samples:
        raise UserError(f"{path}: the file holds no complete sample table (truncated?)")
    if pointers.min() <= 0 or pointers.max() + image.element_size > path.stat().st_size:
        raise UserError(f"{path}: image data lies beyond the end of the file (truncated?)")
    labels = reader.metadata[f"f{names.index(LABEL)}"].astype(np.int64)
    return BetonInfo(path, labels, shape)
