"""Constants and helpers shared by test modules."""

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_WIDTH = 0.125  # ResNet-18 at 1/8 width: 600 BatchNorm channels, fast on CPU


def refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (a strict parser refuses it)")


def strict_json(text: str):
    """``text`` parsed as standard JSON: NaN, Infinity and -Infinity raise."""
    return json.loads(text, parse_constant=refuse_constant)


def strict_json_files(folder: Path) -> dict[str, object]:
    """Every JSON file below ``folder`` (the ``.rnp-fast`` markers included), parsed strictly."""
    paths = [p for p in Path(folder).rglob("*") if p.is_file() and (p.suffix == ".json" or p.name == ".rnp-fast")]
    return {str(p.relative_to(folder)): strict_json(p.read_text(encoding="utf-8")) for p in paths}


def dead_pid() -> int:
    """A pid that no longer exists (reused only after the pid range wraps)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@functools.cache
def benchmark_module(name: str):
    """A script of benchmarks/ as a module (what it renders has one home: the script); registered
    under its name while it loads, as dataclasses need."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
