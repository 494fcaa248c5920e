"""Folders written before markers recorded a proof of each file (marker format 1).

Their marker says at most the folder's kind and the names of the files rnp-fast wrote, so it proves
nothing about any file. Such a folder is rnp-fast's only where every file in it is both claimed (listed
by the marker, or, where the marker lists nothing, one of the names that kind of folder has always
held) and looks like what rnp-fast writes under that name: a JSON result that says it was made by
rnp-fast, a table with the reference's header, a PNG that matplotlib drew, a log of timestamped
lines, a safetensors or torch file of weights. Anything else in it is the user's.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
import zipfile
from pathlib import Path

from rnp_fast.outputs.markers import DEFENSE_RUN, SWEEP_REPORT, SWEEP_STORE, TRAINED_MODEL, Marker

OLD_STORE_FILE = "results.sqlite"  # stores made before stores were marked hold it (sweep.store.DATABASE)

# The files each kind of folder has held since rnp-fast 0.1: what counts as rnp-fast's in a folder
# whose marker does not list its files. Fixed history, not a list to keep up to date.
OLD_FILES = {
    DEFENSE_RUN: (
        "output.log",
        "mask_values.txt",
        "pruning_by_*.txt",
        "pruning.csv",
        "pruning.png",
        "summary.json",
        "config.json",
        "purified.safetensors",
        "purified.pth",
    ),
    TRAINED_MODEL: ("train.log", "model.safetensors", "model.pth", "summary.json"),
    SWEEP_REPORT: ("results.md", "results.csv", "threshold_*.png"),
}
SNIFF_BYTES = 4096  # how much of a file the content checks read (JSON results are read whole, bounded)
MAX_OLD_JSON_BYTES = 64_000_000
LOG_LINE = re.compile(rb"\[\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\] - ")


def guess_kind(directory: Path, marker: Marker) -> str | None:
    """The recorded kind, or for a marker that did not say, the kind its contents show."""
    if marker.kind is not None:
        return marker.kind
    if (directory / OLD_STORE_FILE).is_file():
        return SWEEP_STORE
    if (directory / "model.safetensors").is_file() and (directory / "train.log").is_file():
        return TRAINED_MODEL
    if (directory / "results.md").is_file():
        return SWEEP_REPORT
    if (directory / "summary.json").is_file() or (directory / "mask_values.txt").is_file():
        return DEFENSE_RUN
    return None


def old_file_is_ours(marker: Marker, kind: str | None, name: str, path: Path) -> bool:
    """Is ``name`` (relative to the folder) a file rnp-fast wrote there, judged by name and content?"""
    if marker.old_names is not None:
        claimed = name in marker.old_names
    else:
        claimed = any(fnmatch.fnmatchcase(name, pattern) for pattern in OLD_FILES.get(kind, ()))
    return claimed and looks_like_ours(path)


def looks_like_ours(path: Path) -> bool:
    for pattern, check in CONTENT_CHECKS:
        if fnmatch.fnmatchcase(path.name, pattern):
            try:
                return check(path)
            except (OSError, ValueError, RecursionError, zipfile.BadZipFile, struct.error):
                return False
    return False


def head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(SNIFF_BYTES)


# Keys that only rnp-fast's own result files combine: a defense's summary, its diagnostics.
OLD_JSON_KEYS = (
    frozenset({"clean_acc_before", "asr_before", "pruning_by", "rule"}),
    frozenset({"unlearned_prediction_histogram"}),
)


def rnp_fast_json(path: Path) -> bool:
    """A JSON object that says it is rnp-fast's: ``made_by``, rnp-fast in its versions (its own, or
    its config's: a repeats summary), or the keys only rnp-fast's summaries combine."""
    if path.stat().st_size > MAX_OLD_JSON_BYTES:
        return False
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        return False
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    versions = [data.get("versions"), config.get("versions")]
    return (
        data.get("made_by") == "rnp-fast"
        or any(isinstance(v, dict) and "rnp_fast" in v for v in versions)
        or any(keys <= data.keys() for keys in OLD_JSON_KEYS)
    )


def starts_with(*prefixes: bytes):
    return lambda path: head(path).startswith(prefixes)


def log_file(path: Path) -> bool:
    text = head(path)
    return not text or LOG_LINE.match(text) is not None


def matplotlib_png(path: Path) -> bool:
    text = head(path)
    return text.startswith(b"\x89PNG\r\n\x1a\n") and b"Matplotlib" in text


def safetensors_file(path: Path) -> bool:
    """A safetensors header: 8 bytes of length, then a JSON object of tensors (dtype, shape, offsets)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100_000_000:
            return False
        header = json.loads(handle.read(length))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else {}
    return bool(tensors) and all(
        isinstance(v, dict) and {"dtype", "shape", "data_offsets"} <= set(v) for v in tensors.values()
    )


def torch_weights(path: Path) -> bool:
    """A torch.save zip whose pickle holds a ``state_dict`` (rnp-fast's .pth files: the reference's layout)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        return len(pickles) == 1 and b"state_dict" in archive.read(pickles[0])[:SNIFF_BYTES]


CONTENT_CHECKS = (
    ("*.json", rnp_fast_json),
    ("mask_values.txt", starts_with(b"No \t Layer Name \t Neuron Idx \t Mask Score")),
    ("pruning_by_*.txt", starts_with(b"No \t Layer Name \t Neuron Idx \t Mask \t PoisonLoss")),
    ("pruning.csv", starts_with(b"step,label,pruned,")),
    ("seeds.csv", starts_with(b"seed,")),
    ("*.png", matplotlib_png),
    ("*.log", log_file),
    ("*.safetensors", safetensors_file),
    ("*.pth", torch_weights),
    ("results.md", starts_with("Mean ± standard deviation over seeds".encode())),
    ("results.csv", lambda path: b",seeds," in head(path).partition(b"\n")[0]),
)
