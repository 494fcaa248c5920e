"""What every benchmark script shares around its measurement: the common flags, the demo
defense's run, and the error path (a UserError is one line and its exit code, as in the CLI)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from rnp_fast.config import EngineConfig
from rnp_fast.errors import UserError, one_line, run_script
from rnp_fast.outputs import BENCH_RESULT, vet_json_result


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser(
    doc: str, device: str | None = None, repeats: int | None = None, kind: str = BENCH_RESULT
) -> argparse.ArgumentParser:
    """The script's parser (its docstring's first line as description) with the common flags:
    --out always (a JSON result of ``kind``, checked as the flags are read); --device and --repeats
    when given a default (None: the script has no such flag)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    if device is not None:
        parser.add_argument("--device", default=device, help=f"cpu, cuda, cuda:N or auto (default: {device})")
    if repeats is not None:
        parser.add_argument("--repeats", type=positive, default=repeats, help="timed runs after the warm-up")
    parser.add_argument("--out", type=result_path(kind), help="save the result as JSON here")
    return parser


def result_path(kind: str) -> Callable[[str], str]:
    """--out's type: checked when the flags are read (a benchmark's work must not end in a
    refusal), a new file or a result of ours of ``kind`` (`outputs.vet_json_result`); saving
    checks it again."""

    def checked(text: str) -> str:
        try:
            vet_json_result(text, kind)
        except UserError as error:
            raise argparse.ArgumentTypeError(one_line(error)) from None
        return text

    return checked


def demo_run(**engine):
    """The demo defense's job (bundled model, digits, BadNets) and its resolved run, with these
    EngineConfig fields; resolved for a process that repeats its steps, as a benchmark does (so
    compilation left to auto is on with CUDA)."""
    from rnp_fast.demo import demo_job
    from rnp_fast.resolved import resolve_run

    job = demo_job("", EngineConfig(**engine))
    return job, resolve_run(job.model, job.data, job.attack, job.engine, reuse=True)


def run(main: Callable[[], object]) -> None:
    """Run a script's ``main`` as the CLI runs a command: a UserError is one line and its exit code."""
    run_script(main, Path(sys.modules[main.__module__].__file__).name)
