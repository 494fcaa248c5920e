"""Where `--bn-kernel auto` uses the fused masked-BatchNorm operator: where the WHOLE recover step
measured faster with it.

An isolated BatchNorm timing says little about a training step (torch.compile fuses PyTorch's
BatchNorm with its neighbours; the fused operator is opaque to it), so the table records
recover-step timings with and without the operator, per case: the device, the model (its class
and BatchNorm channel count, which tells widths apart), the input batch shape and the autocast
dtype. ``benchmarks/bench_masked_bn.py --write-auto-table`` (and the GPU probe's steps section)
measures and writes it to ``auto_table.json`` beside this file. A case that is not listed, or a
missing table, means PyTorch: the operator is used only where a measurement says it wins.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
from torch import nn

TABLE = Path(__file__).with_name("auto_table.json")


def case_key(device_name: str, model: nn.Module, shape, amp: torch.dtype | None) -> str:
    """One case of the table: device | model class and BatchNorm channels | batch shape | dtype."""
    channels = sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    dtype = str(amp).removeprefix("torch.") if amp else "float32"
    return f"{device_name}|{type(model).__name__}:{channels}|{'x'.join(str(s) for s in shape)}|{dtype}"


@functools.cache
def measured_cases() -> dict[str, str]:
    """{case key: winner ("fused" or "torch")} from the table, empty when there is none."""
    if not TABLE.is_file():
        return {}
    entries = json.loads(TABLE.read_text(encoding="utf-8")).get("cases", [])
    return {entry["key"]: entry["winner"] for entry in entries}


def fused_wins(model: nn.Module, sample: torch.Tensor, amp: torch.dtype | None) -> bool:
    """True when the table lists this model at ``sample``'s shape on this device as a fused win."""
    device_name = torch.cuda.get_device_name(sample.device) if sample.is_cuda else "cpu"
    return measured_cases().get(case_key(device_name, model, tuple(sample.shape), amp)) == "fused"


def winner(case: dict) -> str:
    """The kernel a measured case ({torch_ms, fused_ms}) takes: the faster whole recover step."""
    return "fused" if case["fused_ms"] < case["torch_ms"] else "torch"


def vet_table_path(path: Path | None = None, flag: str = "--table") -> Path:
    """Where a table may be written: a new file or a table rnp-fast wrote (checked before any work)."""
    from rnp_fast.outputs import is_our_json, vet_output_file

    return vet_output_file(path or TABLE, flag=flag, owned=is_our_json)


def write_table(cases: list[dict], provenance: dict, path: Path | None = None, flag: str = "--table") -> Path:
    """Write measured cases ({key, torch_ms, fused_ms, ...}), each with its winner, merged with the
    cases already in the table (a new measurement of the same case replaces the old one);
    atomically, and only over a table of ours (`outputs.save_json`)."""
    from rnp_fast.outputs import save_json

    path = vet_table_path(path, flag)  # before reading it: never merge into a file rnp-fast did not make
    existing = json.loads(path.read_text(encoding="utf-8")).get("cases", []) if path.is_file() else []
    merged = {entry["key"]: entry for entry in existing}
    for case in cases:
        merged[case["key"]] = {**case, "winner": winner(case)}
    save_json({**provenance, "cases": sorted(merged.values(), key=lambda e: e["key"])}, path, flag)
    measured_cases.cache_clear()
    return path
