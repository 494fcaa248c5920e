"""Stage 1, unlearning: gradient ascent on the clean defense data until accuracy collapses.

All parameters are trained to maximise cross-entropy (minimise -CE) with SGD; the model stays in
train mode. After each epoch, if training accuracy <= ``clean_threshold`` the stage stops and this
state is the unlearned model. If it never gets there, the last state is kept and the result says so
(the reference has no model to continue with in that case).

Gradient ascent can diverge (a large learning rate sends the loss or the weights to inf/NaN). The
loop checks once per epoch; a diverged epoch is undone and unlearning stops with the last finite
state (the run says so), or, if the very first epoch diverged, the run stops with a clear error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp_fast.config import RNPConfig
from rnp_fast.engine import EAGER, EngineSettings
from rnp_fast.errors import UserError
from rnp_fast.learning import build_stage, unlearn_recipe
from rnp_fast.loops import EpochStats
from rnp_fast.steps import StepTimings


@dataclass
class UnlearnResult:
    model: nn.Module
    stop_epoch: int  # the last epoch run
    reached_threshold: bool
    history: list[EpochStats] = field(default_factory=list)
    diverged_epoch: int | None = None  # the epoch whose loss or weights went non-finite (then undone)
    step_timings: StepTimings = field(default_factory=StepTimings)


def unlearn(
    backdoored: nn.Module,
    loader,
    config: RNPConfig,
    on_epoch: Callable[[nn.Module, EpochStats], None] | None = None,
    engine: EngineSettings = EAGER,
) -> UnlearnResult:
    """Unlearn a copy of ``backdoored`` over ``loader`` (epochs 0..unlearning_epochs)."""
    batch_size = getattr(loader, "batch_size", None)
    stage = build_stage(unlearn_recipe(config), copy.deepcopy(backdoored), engine, batch_size)
    model, timings = stage.model, stage.timings
    history: list[EpochStats] = []
    last_finite = copy.deepcopy(model.state_dict())
    for epoch in range(config.unlearning_epochs + 1):
        stats = stage.epoch(loader, epoch)
        if not (math.isfinite(stats.loss) and weights_finite(model)):
            return diverged(model, last_finite, epoch, stats, history, timings)
        last_finite = copy.deepcopy(model.state_dict())
        history.append(stats)
        if on_epoch is not None:
            on_epoch(model, stats)
        if stats.acc <= config.clean_threshold and config.early_stop:
            return UnlearnResult(model, epoch, True, history, step_timings=timings)
    reached = bool(history) and history[-1].acc <= config.clean_threshold
    return UnlearnResult(model, config.unlearning_epochs, reached, history, step_timings=timings)


def weights_finite(model: nn.Module) -> bool:
    """One host sync for the whole model (checked once per epoch, not per step)."""
    return bool(
        torch.stack([torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()]).all()
    )


def diverged(model: nn.Module, last_finite: dict, epoch: int, stats: EpochStats, history, timings) -> UnlearnResult:
    """Gradient ascent blew up: keep the state before this epoch, or refuse if there is none."""
    if epoch == 0:
        raise UserError(f"unlearning diverged in its first epoch (loss {stats.loss}); lower --unlearning-lr")
    model.load_state_dict(last_finite)
    return UnlearnResult(model, epoch - 1, False, history, diverged_epoch=epoch, step_timings=timings)
