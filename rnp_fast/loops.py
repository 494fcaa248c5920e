"""The epoch loop shared by unlearning, recovering and backdoor training.

Counters stay on the device and are read once per epoch, so a CUDA loop never waits on the host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

# step(images, labels) -> (summed loss over the batch, number of correct predictions), both tensors
LearningStep = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class EpochStats:
    epoch: int
    lr: float
    seconds: float
    loss: float  # mean per-image cross-entropy
    acc: float  # correct predictions / images seen
    data_seconds: float = 0.0  # host time spent waiting for batches (loading, augmenting, poisoning)


def run_epoch(loader: Iterable, step: LearningStep, num_images: int, epoch: int, lr: float) -> EpochStats:
    """One pass of ``step`` over ``loader``; loss and accuracy averaged over ``num_images``."""
    start = time.perf_counter()
    loss_sum, correct = None, None
    batches = iter(loader)
    data_seconds = 0.0
    while True:
        tick = time.perf_counter()
        batch = next(batches, None)
        data_seconds += time.perf_counter() - tick
        if batch is None:
            break
        images, labels = batch
        batch_loss, batch_correct = step(images, labels)
        loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
        correct = batch_correct if correct is None else correct + batch_correct
    totals = torch.stack([loss_sum.float(), correct.float()]).tolist()  # the epoch's one host sync
    seconds = time.perf_counter() - start
    return EpochStats(epoch, lr, seconds, totals[0] / num_images, totals[1] / num_images, data_seconds)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return optimizer.param_groups[0]["lr"]
