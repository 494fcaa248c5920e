"""`rnp-fast convert SOURCE OUT.beton`: one split of a dataset source as an FFCV file.

The file keeps the source's order and its raw uint8 pixels (see `loaders.beton`), so training
from it (``train-backdoor --train-beton``) sees exactly the images the source gives, and the
poisoning plan, drawn from the source's labels, lines up with it sample by sample.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.loaders.beton import open_beton, require_ffcv, write_beton
from rnp_fast.loaders.sources import DATASETS, load_source
from rnp_fast.outputs import vet_output_file

SPLITS = ("train", "test")


def convert(
    source: str,
    out: str,
    split: str = "train",
    data_dir: str | None = None,
    image_size: int | None = None,
    download: bool = False,
    quiet: bool = False,
) -> dict:
    """Write ``split`` of dataset ``source`` to ``out``; returns a summary of what was written."""
    if split not in SPLITS:
        raise UserError(f"--split must be train or test, got {split!r}")
    if source not in DATASETS:  # a typo is reported as such, with or without FFCV installed
        raise UserError(f"unknown dataset {source!r}; choose one of: {', '.join(DATASETS)}")
    require_ffcv()  # before the (possibly long) dataset decode
    target = vet_output_file(out, [data_dir], flag="OUT.beton", owned=is_our_beton)
    started = time.perf_counter()
    data = getattr(load_source(source, data_dir, download, image_size), split)
    with progress_bars(not quiet):
        write_beton(data, target)
    info = open_beton(target)  # read back the header: the file is usable
    return {
        "path": str(target.resolve()),
        "dataset": source,
        "split": split,
        "images": len(info),
        "image_shape": list(info.image_shape),
        "bytes": target.stat().st_size,
        "seconds": time.perf_counter() - started,
    }


def is_our_beton(path: Path) -> bool:
    """A .beton that `rnp-fast convert` wrote (its header holds our image and label fields)."""
    try:
        open_beton(path)
    except UserError:
        return False
    return True


@contextmanager
def progress_bars(enabled: bool):
    """FFCV's writer draws a tqdm bar; ``TQDM_DISABLE`` silences it for --quiet."""
    previous = os.environ.get("TQDM_DISABLE")
    if not enabled:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous
