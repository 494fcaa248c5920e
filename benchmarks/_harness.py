"""The benchmark scripts' one harness: timing, the common flags, the saved result, the error path.

Scripts run as ``python benchmarks/NAME.py``, which puts this folder on the module search path: they
``import _harness`` as it is. Timing follows the design's rules: the device is synchronised around
every timed call, warm-up runs (compilation, caches, allocator growth) are reported apart from the
timed repeats, and results are medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rnp_fast.config import EngineConfig
from rnp_fast.demo import demo_job
from rnp_fast.errors import run_script
from rnp_fast.outputs import save_json
from rnp_fast.provenance import provenance
from rnp_fast.resolved import resolve_run

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


def ratios(medians: dict[str, float], base: str) -> dict[str, float]:
    """Every other variant's median over ``base``'s (above 1: ``base`` is faster)."""
    if base not in medians:
        return {}
    return {f"{name}_over_{base}": value / medians[base] for name, value in medians.items() if name != base}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser(doc: str, device: str | None = None, repeats: int | None = None) -> argparse.ArgumentParser:
    """The script's parser (its docstring's first line as description) with the common flags:
    --out always; --device and --repeats when given a default (None: the script has no such flag)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if device is not None:
        parser.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N or auto (default: {device})")
    if repeats is not None:
        parser.add_argument("--repeats", type=positive, default=repeats, help="timed runs after the warm-up")
    parser.add_argument("--out", help="save the result as JSON here")
    return parser


def demo_run(**engine):
    """The demo defense's job (bundled model, digits, BadNets) and its resolved run, with these
    EngineConfig fields; resolved for a process that repeats its steps, as a benchmark does (so
    compilation left to auto is on with CUDA)."""
    job = demo_job("", EngineConfig(**engine))
    return job, resolve_run(job.model, job.data, job.attack, job.engine, reuse=True)


def write_result(result: dict, out: str | None, device: torch.device | str = CPU, echo: bool = False) -> None:
    """The result with its provenance (device, CPU, versions, date, command) first; printed as JSON
    when ``echo``, saved at ``out`` when given (atomically, never over a file rnp-fast did not make)."""
    if not (echo or out):
        return
    report = {**provenance(device), **result}
    if echo:
        print(json.dumps(report, indent=2))
    if out:
        print(f"saved {save_json(report, out)}", file=sys.stderr)


def run(main: Callable[[], None]) -> None:
    """Run a script's ``main`` as the CLI runs a command: a UserError is one line and its exit code."""
    run_script(main, Path(sys.modules[main.__module__].__file__).name)
