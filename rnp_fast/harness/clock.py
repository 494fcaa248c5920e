"""Timing by the design's rules: the device synchronised around every timed call, warm-up runs
(compilation, caches, allocator growth) reported apart from the timed repeats, medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

CPU = torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA calls return before the GPU is done: wait for it
        torch.cuda.synchronize(device)


def seconds(function: Callable[[], object], device: torch.device = CPU) -> float:
    """Wall-clock seconds of one call, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def timing(samples: list[float], warmup: int = 1) -> dict:
    """The JSON form of timed runs: the first ``warmup`` apart (count and total), the rest and their median."""
    runs = samples[warmup:]
    return {
        "warmup_runs": warmup,
        "warmup_s": sum(samples[:warmup]),
        "runs_s": runs,
        "median_s": statistics.median(runs),
    }


def measure(function: Callable[[], object], repeats: int, device: torch.device = CPU, warmup: int = 1) -> dict:
    """``warmup`` untimed-for-the-median calls of ``function``, then ``repeats`` timed ones (see `timing`)."""
    return timing([seconds(function, device) for _ in range(warmup + repeats)], warmup)


def median_seconds(function: Callable[[], object], repeats: int, device: torch.device = CPU, warmup: int = 1) -> float:
    return measure(function, repeats, device, warmup)["median_s"]


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over runs that each time the same parts (e.g. a defense's phases)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def ratios(medians: dict[str, float], base: str) -> dict[str, float]:
    """Every other variant's median over ``base``'s (above 1: ``base`` is faster)."""
    if base not in medians:
        return {}
    return {f"{name}_over_{base}": value / medians[base] for name, value in medians.items() if name != base}
