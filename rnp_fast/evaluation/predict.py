"""Logits of a model over device-resident uint8 images, normalised batch by batch, in the
engine's precision (autocast) and layout: every evaluation of a run uses the same arithmetic."""

from __future__ import annotations

import torch
from torch import nn

from rnp_fast.engine import autocast
from rnp_fast.evaluation.metrics import Outputs
from rnp_fast.evaluation.test_sets import TestSets
from rnp_fast.loaders.augment import normalise


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean,
    std,
    batch_size: int,
    channels_last: bool = False,
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """float32 logits [N, K] of ``model`` in eval mode over uint8 ``images``."""
    model.eval()
    if not len(images):
        return no_logits(images.device)
    with autocast(images.device, amp):
        chunks = [
            model(model_input(images[start : start + batch_size], mean, std, channels_last)).float()
            for start in range(0, len(images), batch_size)
        ]
    return torch.cat(chunks)


def no_logits(device: torch.device) -> torch.Tensor:
    """The logits of an empty test set (a set the Python API's caller did not give): NaN metrics."""
    return torch.empty(0, 0, device=device)


def model_input(images: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """Normalised float images, in channels_last when asked (the convolutions follow the input)."""
    x = normalise(images, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def model_outputs(
    model: nn.Module, data: TestSets, batch_size: int, channels_last: bool = False, amp: torch.dtype | None = None
) -> Outputs:
    return Outputs(
        predict(model, data.clean.images, data.mean, data.std, batch_size, channels_last, amp),
        predict(model, data.poisoned.images, data.mean, data.std, batch_size, channels_last, amp),
    )
