"""Device selection with a clear error when the asked-for device is absent; what the CPU is."""

from __future__ import annotations

import functools

import torch

from rnp_fast.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for a GPU, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) present")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported (cpu, cuda, cuda:N or auto)")
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


@functools.cache
def cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo ("model name", "flags"), or None where there is
    none (not Linux); read once per field and process."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next((line.split(":", 1)[1].strip() for line in handle if line.split(":")[0].strip() == field), None)
    except OSError:
        return None
