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
from rnp_fast.engine import EAGER, EngineSettings, apply_engine, sgd
from rnp_fast.loops import EpochStats, current_lr, run_epoch
from rnp_fast.masked_bn import mask_clamp, masked_batchnorm_layers
from rnp_fast.prune import Channel
from rnp_fast.steps import StepTimings, make_step, recover_recipe


@dataclass
class RecoverResult:
    model: nn.Module
    channels: list[Channel]  # every BatchNorm channel with its mask value, in module order
    history: list[EpochStats] = field(default_factory=list)
    step_timings: StepTimings = field(default_factory=StepTimings)


def prepare_masked_model(masked: nn.Module, unlearned: nn.Module) -> list[nn.Parameter]:
    """Load the unlearned weights into ``masked`` and freeze all but the masks (returned)."""
    missing, unexpected = masked.load_state_dict(unlearned.state_dict(), strict=False)
    assert not unexpected and all(key.endswith("neuron_mask") for key in missing), (missing, unexpected)
    for parameter in masked.parameters():
        parameter.requires_grad_(False)
    masks = [layer.neuron_mask for _, layer in masked_batchnorm_layers(masked)]
    for mask in masks:
        mask.requires_grad_(True)
    return masks


def recover(
    masked: nn.Module,
    unlearned: nn.Module,
    loader,
    config: RNPConfig,
    on_epoch: Callable[[nn.Module, EpochStats], None] | None = None,
    engine: EngineSettings = EAGER,
    sample: torch.Tensor | None = None,
) -> RecoverResult:
    """Train the masks of ``masked`` (epochs 1..recovering_epochs) starting from ``unlearned``.
    ``sample``: one training batch, which tells the `auto` BatchNorm kernel choice the shapes."""
    masks = prepare_masked_model(masked, unlearned)
    apply_engine(masked, engine, sample)
    optimizer = sgd(masks, masks[0].device, lr=config.recovering_lr, momentum=config.momentum)
    timings = StepTimings()
    step = make_step(
        masked,
        optimizer,
        recover_recipe(config.alpha),
        engine,
        getattr(loader, "batch_size", None),
        mask_clamp(masks, engine),
        timings,
    )
    history: list[EpochStats] = []
    for epoch in range(1, config.recovering_epochs + 1):
        loader.set_epoch(epoch)
        masked.train()
        stats = run_epoch(loader, step, loader.num_images, epoch, current_lr(optimizer))
        history.append(stats)
        if on_epoch is not None:
            on_epoch(masked, stats)
    return RecoverResult(masked, mask_channels(masked), history, timings)


def mask_channels(masked: nn.Module) -> list[Channel]:
    """Every channel's mask value, layer by layer in module order, channel by channel."""
    channels = []
    for name, layer in masked_batchnorm_layers(masked):
        for index, value in enumerate(layer.neuron_mask.detach().float().cpu().tolist()):
            channels.append(Channel(name, index, value))
    return channels
