"""Stage 1, unlearning: gradient ascent on the clean defense data until accuracy collapses.

All parameters are trained to maximise cross-entropy (minimise -CE) with SGD; the model stays in
train mode. After each epoch, if training accuracy <= ``clean_threshold`` the stage stops and this
state is the unlearned model. If it never gets there, the last state is kept and the result says so
(the reference has no model to continue with in that case).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.config import RNPConfig
from rnp_fast.loops import EpochStats, current_lr, run_epoch


@dataclass
class UnlearnResult:
    model: nn.Module
    stop_epoch: int  # the last epoch run
    reached_threshold: bool
    history: list[EpochStats] = field(default_factory=list)


def unlearn_step(model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float):
    def step(images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        (-loss).backward()  # ascent: minimise the negative loss
        if grad_clip > 0:  # off by default: the reference clips before backward, a no-op
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()

    return step


def unlearn(
    backdoored: nn.Module,
    loader,
    config: RNPConfig,
    on_epoch: Callable[[nn.Module, EpochStats], None] | None = None,
) -> UnlearnResult:
    """Unlearn a copy of ``backdoored`` over ``loader`` (epochs 0..unlearning_epochs)."""
    model = copy.deepcopy(backdoored).train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.unlearning_lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(config.schedule), gamma=0.1)
    step = unlearn_step(model, optimizer, config.grad_clip)
    history: list[EpochStats] = []
    for epoch in range(config.unlearning_epochs + 1):
        loader.set_epoch(epoch)
        model.train()
        stats = run_epoch(loader, step, loader.num_images, epoch, current_lr(optimizer))
        scheduler.step()
        history.append(stats)
        if on_epoch is not None:
            on_epoch(model, stats)
        if stats.acc <= config.clean_threshold:
            return UnlearnResult(model, epoch, True, history)
    return UnlearnResult(model, config.unlearning_epochs, False, history)
