"""What every saved result records about where it came from: versions, device, date, command."""

from __future__ import annotations

import datetime as dt
import os
import platform
import sys

import torch

from rnp_fast import __version__
from rnp_fast.device import cpuinfo, describe_device


def versions() -> dict:
    """Library versions that change results or speed (Triton and CUDA only where present)."""
    import numpy

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "rnp_fast": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def cpu_description() -> dict:
    """CPU results depend on the CPU: its model and the threads torch uses are part of the result."""
    from rnp_fast.capacity import available_cores

    model = cpuinfo("model name") or platform.processor() or None
    return {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "cores_available": available_cores(),  # to this process: affinity, cgroup quota
        "torch_threads": torch.get_num_threads(),
    }


def provenance(device: torch.device | str, command: str | None = None) -> dict:
    """Device (with the CPU's model and threads), versions, UTC date and the command line."""
    device = torch.device(device)
    return {
        "device": describe_device(device),
        **cpu_description(),
        "versions": versions(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
