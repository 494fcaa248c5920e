"""Where `--bn-kernel auto` uses the Triton masked BatchNorm: the shapes where it measured faster.

``auto_table.json`` (beside this file) lists the measured winners as produced by
``benchmarks/bench_masked_bn.py --write-auto-table``: one entry per (channels, height, width,
dtype) with the provider that won forward plus backward. A shape that is not listed, or a table
that is absent, means PyTorch: the kernel is used only where a measurement says it wins.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("auto_table.json")


@functools.cache
def measured_winners() -> dict[tuple[int, int, int, str], str]:
    if not TABLE.is_file():
        return {}
    entries = json.loads(TABLE.read_text(encoding="utf-8")).get("winners", [])
    return {(e["channels"], e["height"], e["width"], e["dtype"]): e["provider"] for e in entries}


def triton_wins(x: torch.Tensor) -> bool:
    _, channels, height, width = x.shape
    dtype = str(x.dtype).removeprefix("torch.")
    return measured_winners().get((channels, height, width, dtype)) == "triton"
