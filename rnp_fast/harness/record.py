"""Saving a measurement: its provenance (device, CPU, versions, date, command) first, written
atomically, never over a file rnp-fast did not make."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from rnp_fast.outputs import BENCH_RESULT, json_text, save_json
from rnp_fast.provenance import provenance


def with_provenance(result: dict, device: torch.device | str, command: str | None = None) -> dict:
    return {**provenance(device, command), **result}


def save(result: dict, out: str | Path, flag: str = "--out") -> Path:
    """Save ``result`` at ``out`` atomically; values JSON cannot hold (a dtype, a path) are saved
    as text rather than lose the file."""
    return save_json(json.loads(json_text(result)), out, flag, kind=BENCH_RESULT)


def write_result(result: dict, out: str | None, device: torch.device | str = "cpu", echo: bool = False) -> None:
    """The result with its provenance first; saved at ``out`` when given, then printed as JSON when
    ``echo`` (as saved: with the file's stamps)."""
    if not (echo or out):
        return
    report = with_provenance(result, device)
    if out:
        path = save(report, out)
        report = json.loads(path.read_text())
        print(f"saved {path}", file=sys.stderr)
    if echo:
        print(json_text(report), end="")
