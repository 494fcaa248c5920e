"""A model seen as a chain of stages, for evaluators that share work between pruning candidates.

Each model's ``stages()`` returns callables whose composition is exactly its ``forward`` (a test
checks this for every architecture). Residual blocks are whole stages, so a stage takes one tensor
and returns one: candidates that agree on every BatchNorm channel of the first k stages produce the
same activations there and can share them. ``owns`` names the submodules a stage runs; the
BatchNorms inside them belong to that stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    run: Callable[[torch.Tensor], torch.Tensor]
    owns: tuple[str, ...]  # module names ("" owns the whole model)


def model_stages(model: nn.Module) -> list[Stage]:
    """The model's own stages, or the whole model as one stage when it defines none."""
    stages = getattr(model, "stages", None)
    return stages() if callable(stages) else [Stage(model, ("",))]


def blocks_of(model: nn.Module, *containers: str) -> list[Stage]:
    """One stage per block of the named Sequential containers, in order."""
    return [
        Stage(block, (f"{name}.{index}",)) for name in containers for index, block in enumerate(getattr(model, name))
    ]


def stage_of_module(stages: list[Stage], module_name: str) -> int:
    for number, stage in enumerate(stages):
        for owned in stage.owns:
            if owned == "" or module_name == owned or module_name.startswith(owned + "."):
                return number
    raise ValueError(f"module {module_name!r} is in no stage of the model")


def run_stages(stages: list[Stage], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage.run(x)
    return x
