"""Shared fixtures: tiny models and checkpoints on the embedded digits set (CPU, seconds)."""

import os
import subprocess
import sys
import time

import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; this must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tests_support import TINY_WIDTH  # noqa: E402

from rnp_fast.checkpoint import save_safetensors  # noqa: E402
from rnp_fast.models import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The reference's published logs and trigger files: $RNP_REFERENCE_DATA, else the shared folder
# beside the checkout, else the copies kept in tests/data/reference (so CI runs these tests too).
SHARED_REFERENCE_DATA = REPO.parent / "shared" / "reference-data"
REFERENCE_DATA = Path(
    os.environ.get(
        "RNP_REFERENCE_DATA",
        SHARED_REFERENCE_DATA if SHARED_REFERENCE_DATA.is_dir() else REPO / "tests" / "data" / "reference",
    )
)


@pytest.fixture
def reference_file():
    """reference_file(name) -> path of a file in shared/reference-data (skips if absent)."""

    def find(name: str) -> Path:
        path = REFERENCE_DATA / name
        if not path.is_file():
            pytest.skip(f"reference data {path} not present (set RNP_REFERENCE_DATA)")
        return path

    return find


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised width-0.125 ResNet-18 saved as safetensors (the pipeline's input)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, TINY_WIDTH)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_safetensors(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`rnp-fast demo --device cpu` run once per session as a new user runs it (heavy tests only):
    (its run directory, what it printed, its wall seconds)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "rnp_fast", "demo", "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=1800,  # minutes when idle (test_demo holds it to 3); a loaded shared CPU took 24
    )
    seconds = time.perf_counter() - started
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout + result.stderr, seconds
