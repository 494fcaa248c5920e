"""Stage 3, pruning: rank channels by mask value and zero their BatchNorm gamma.

Channels are sorted ascending by mask value; ties keep module order (a stable sort), which is the
order of ``mask_values.txt``. Pruning a channel sets gamma to 0 in the ORIGINAL backdoored model and
keeps beta, so the channel outputs a constant. Two schedules:

- by threshold t = 0, step, 2*step, ... <= max: prune every channel whose mask <= t (cumulative);
  each t is the decimal i * step names (0.15, not the float product 0.15000000000000002);
- by number N = step, 2*step, ... <= max: prune the N lowest channels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal

import torch
from torch import nn


@dataclass(frozen=True)
class Channel:
    layer: str  # BatchNorm module name, e.g. "layer4.1.bn2"
    index: int  # channel index inside that layer
    value: float  # mask value


@dataclass
class PruneStep:
    """One candidate: the ``count`` lowest channels of the ranking, labelled by threshold or count."""

    label: float  # the threshold (or the channel count with pruning by number)
    count: int
    channels: list[Channel]
    # The first channel of the ranking left unpruned: the reference's threshold table names this one
    # (its loop stops at the first mask above the threshold and reports it), as its published
    # pruning_by_threshold.txt shows for all 19 rows.
    boundary: Channel | None = None
    # The threshold as the reference's table prints it: its float product i * step (0.15000000000000002
    # where the label is 0.15); None: print the label. Only pruning_by_threshold.txt shows it.
    reference_label: float | None = None

    @property
    def last(self) -> Channel | None:
        return self.channels[-1] if self.channels else None


def rank_channels(channels: list[Channel]) -> list[Channel]:
    """Ascending by mask value; Python's sort is stable, so ties stay in module order."""
    return sorted(channels, key=lambda channel: channel.value)


def thresholds(maximum: float, step: float) -> list[float]:
    """0, step, 2*step, ... up to ``maximum``, each the decimal it names: i * step counted in
    decimal arithmetic from the numbers as written (3 * 0.05 is 0.15). The reference multiplies
    floats (0.15000000000000002); `reference_thresholds` gives its values for its table."""
    last, size = Decimal(repr(maximum)), Decimal(repr(step))
    return [float(i * size) for i in range(int(last / size) + 1)]


def reference_thresholds(maximum: float, step: float) -> list[float]:
    """The reference's float products i * step of the same schedule, as its table prints them."""
    return [i * step for i in range(len(thresholds(maximum, step)))]


def threshold_schedule(ranked: list[Channel], maximum: float, step: float) -> list[PruneStep]:
    steps = threshold_steps(ranked, thresholds(maximum, step))
    return [replace(s, reference_label=r) for s, r in zip(steps, reference_thresholds(maximum, step), strict=True)]


def threshold_steps(ranked: list[Channel], levels: list[float]) -> list[PruneStep]:
    """One step per threshold t, pruning every channel whose mask value is <= t."""
    values = torch.tensor([channel.value for channel in ranked], dtype=torch.float64)
    counts = torch.searchsorted(values, torch.tensor(levels, dtype=torch.float64), right=True).tolist()
    return [lowest_step(ranked, level, count) for level, count in zip(levels, counts, strict=True)]


def lowest_step(ranked: list[Channel], label: float, count: int) -> PruneStep:
    """The candidate pruning the ``count`` lowest channels of ``ranked``, labelled ``label``."""
    boundary = ranked[count] if count < len(ranked) else None
    return PruneStep(label, count, ranked[:count], boundary)


def number_schedule(ranked: list[Channel], maximum: int, step: int) -> list[PruneStep]:
    counts = range(int(step), min(int(maximum), len(ranked)) + 1, int(step))
    return [lowest_step(ranked, float(count), count) for count in counts]


def schedule(ranked: list[Channel], by: str, maximum: float, step: float) -> list[PruneStep]:
    if by == "threshold":
        return threshold_schedule(ranked, maximum, step)
    return number_schedule(ranked, int(maximum), int(step))


def single_threshold_step(ranked: list[Channel], threshold: float) -> PruneStep:
    return threshold_steps(ranked, [threshold])[0]


def batchnorm_sizes(model: nn.Module) -> dict[str, int]:
    """{BatchNorm layer name: channel count}, in module order: the channels a mask file must list."""
    return {name: m.num_features for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@torch.no_grad()
def prune_(model: nn.Module, channels: list[Channel]) -> nn.Module:
    """Zero gamma of ``channels`` in ``model`` (in place); beta is kept."""
    modules = dict(model.named_modules())
    by_layer: dict[str, list[int]] = {}
    for channel in channels:
        by_layer.setdefault(channel.layer, []).append(channel.index)
    for layer, indices in by_layer.items():
        modules[layer].weight[torch.tensor(indices, device=modules[layer].weight.device)] = 0.0
    return model


def pruned_state_dict(state: dict[str, torch.Tensor], channels: list[Channel]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with gamma of ``channels`` set to 0."""
    pruned = {key: value.clone() for key, value in state.items()}
    for channel in channels:
        pruned[f"{channel.layer}.weight"][channel.index] = 0.0
    return pruned
