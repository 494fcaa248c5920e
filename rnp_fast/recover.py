"""Stage 2, recovering: learn one mask per BatchNorm channel on the unlearned model.

The unlearned weights are loaded into the same architecture built with `MaskedBatchNorm2d`; only
the masks train (SGD, loss = alpha * CE, train mode), and every mask is clamped into [0, 1] after
each step. Channels the backdoor depends on come out with small mask values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp_fast.config import RNPConfig
from rnp_fast.engine import EAGER, EngineSettings
from rnp_fast.learning import build_stage, recover_recipe
from rnp_fast.loops import EpochStats
from rnp_fast.masked_batchnorm import masked_batchnorm_layers
from rnp_fast.prune import Channel
from rnp_fast.steps import StepTimings


@dataclass
class RecoverResult:
    model: nn.Module
    channels: list[Channel]  # every BatchNorm channel with its mask value, in module order
    history: list[EpochStats] = field(default_factory=list)
    step_timings: StepTimings = field(default_factory=StepTimings)


def recover(
    masked: nn.Module,
    unlearned: nn.Module,
    loader,
    config: RNPConfig,
    on_epoch: Callable[[nn.Module, EpochStats], None] | None = None,
    engine: EngineSettings = EAGER,
    sample: torch.Tensor | None = None,
) -> RecoverResult:
    """Train the masks of ``masked`` (epochs 1..recovering_epochs) starting from ``unlearned``'s
    weights; only the masks train. ``sample``: one training batch, which tells the `auto`
    BatchNorm kernel choice the shapes."""
    batch_size = getattr(loader, "batch_size", None)
    stage = build_stage(recover_recipe(config), masked, engine, batch_size, sample, weights=unlearned)
    history: list[EpochStats] = []
    for epoch in range(1, config.recovering_epochs + 1):
        history.append(stage.epoch(loader, epoch))
        if on_epoch is not None:
            on_epoch(masked, history[-1])
    return RecoverResult(masked, mask_channels(masked), history, stage.timings)


def mask_channels(masked: nn.Module) -> list[Channel]:
    """Every channel's mask value, layer by layer in module order, channel by channel."""
    channels = []
    for name, layer in masked_batchnorm_layers(masked):
        for index, value in enumerate(layer.neuron_mask.detach().float().cpu().tolist()):
            channels.append(Channel(name, index, value))
    return channels
