"""JSON result files: how rnp-fast writes JSON (``json_text``), and saving a result file (a bench
or probe result) atomically, only over a file of ours of the same kind."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from rnp_fast.outputs.errors import OutputError, os_error
from rnp_fast.outputs.markers import MADE_BY
from rnp_fast.outputs.vetting import vet_output_file

MAX_JSON_BYTES = 64_000_000  # a result file of ours is small; a bigger one is not read to find out


def json_text(data, indent: int | None = 2, sort_keys: bool = False) -> str:
    """``data`` as the JSON text rnp-fast writes (one home for every JSON file it saves), strict:
    no NaN or Infinity, which JSON does not have (Python's NaN tokens break other parsers). A
    figure that was not measured is null with a reason where it is produced; a non-finite float
    reaching this point is a bug, named by its path."""
    try:
        return json.dumps(data, indent=indent, default=str, allow_nan=False, sort_keys=sort_keys) + "\n"
    except ValueError:
        path = non_finite_path(data)
        if path is None:
            raise
        raise ValueError(f"{path} is not a finite number: rnp-fast writes no NaN or Infinity to JSON") from None


def non_finite_path(data, path: str = "$") -> str | None:
    """Where in ``data`` the first non-finite float is (``$.timings.total``), or None."""
    if isinstance(data, float):
        return None if math.isfinite(data) else path
    if isinstance(data, dict):
        found = (non_finite_path(value, f"{path}.{key}") for key, value in data.items())
    elif isinstance(data, (list, tuple)):
        found = (non_finite_path(value, f"{path}[{i}]") for i, value in enumerate(data))
    else:
        return None
    return next((p for p in found if p is not None), None)


def read_small_json(path: Path, limit: int = MAX_JSON_BYTES):
    """The JSON value in ``path``, or None when it is not JSON, too big to be ours, or too deep."""
    try:
        if path.stat().st_size > limit:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None


def is_our_json(path: Path) -> bool:
    """A JSON result rnp-fast saved (``made_by``; older results: their ``versions.rnp_fast``)."""
    data = read_small_json(path)
    if not isinstance(data, dict):
        return False
    versions = data.get("versions")
    return data.get("made_by") == MADE_BY or (isinstance(versions, dict) and "rnp_fast" in versions)


def json_kind(path: Path) -> str | None:
    data = read_small_json(path)
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


def refuse_other_json_kind(target: Path, kind: str | None, flag: str) -> None:
    """A JSON result of ours records its kind (a bench result, a probe result): one of another kind
    is not replaced. Results saved before kinds were recorded may be."""
    found = json_kind(target) if kind is not None and target.is_file() else None
    if found not in (None, kind):
        raise OutputError(f"{flag} {target} is a {found} made by rnp-fast, not a {kind}; choose another {flag}")


BENCH_RESULT = "bench result"  # the kinds of JSON result rnp-fast writes (`save_json`'s ``kind``)
PROBE_RESULT = "probe result"


def vet_json_result(path: str | Path, kind: str | None, flag: str = "--out") -> Path:
    """Where a JSON result of ``kind`` may be written: a new file, or a result of ours of that kind
    (else a one-line refusal); commands check it before their work, `save_json` again when saving."""
    target = vet_output_file(path, flag=flag, owned=is_our_json)
    refuse_other_json_kind(target, kind, flag)
    return target


def save_json(data: dict, path: str | Path, flag: str = "--out", kind: str | None = None) -> Path:
    """Write a result file atomically (an interrupted writer never leaves half a JSON file), only
    over a file of ours (of the same ``kind``); the data is stamped ``made_by`` (and ``kind``)."""
    target = vet_json_result(path, kind, flag)
    staging = target.with_name(f".{target.name}.{os.getpid()}.partial")
    stamp = {"made_by": MADE_BY, **({"kind": kind} if kind else {})}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.write_text(json_text({**stamp, **data}), encoding="utf-8")
        staging.replace(target)
    except OSError as error:
        staging.unlink(missing_ok=True)
        raise os_error(target, error, exit_code=1) from None
    return target
