"""The demo's ResNet-18 written as a model of its own: other module names, its own forward.

A stand-in for a model from the user's code (or torchvision): nothing here comes from the zoo.
Its BatchNorm layers are registered in the zoo's order, so a ranking's ties break the same way.
`own_resnet18` is the factory form, for ``--arch own_resnet:own_resnet18``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Unit(nn.Module):
    """A residual unit: two 3x3 convolutions, a projection when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.first = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.first_norm = nn.BatchNorm2d(cout)
        self.second = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.second_norm = nn.BatchNorm2d(cout)
        changes = stride != 1 or cin != cout
        self.skip = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if changes else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.first_norm(self.first(x)))
        y = self.second_norm(self.second(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


class OwnResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, base: int = 16):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base]
        self.stem = nn.Conv2d(3, base, 3, 1, 1, bias=False)
        self.stem_norm = nn.BatchNorm2d(base)
        units, cin = [], base
        for number, width in enumerate(widths):
            for repeat in range(2):
                units.append(Unit(cin, width, 2 if number and not repeat else 1))
                cin = width
        self.units = nn.ModuleList(units)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_norm(self.stem(x)))
        for unit in self.units:
            x = unit(x)
        return self.head(F.avg_pool2d(x, x.shape[-2:]).flatten(1))


def own_resnet18(num_classes: int = 10, base: int = 16) -> OwnResNet18:
    return OwnResNet18(num_classes, base)


def copy_weights(source: dict[str, torch.Tensor], model: nn.Module) -> nn.Module:
    """``source``'s tensors into ``model``, position by position (the names differ, the order not)."""
    target = model.state_dict()
    assert len(source) == len(target)
    for (key, value), name in zip(source.items(), target, strict=True):
        assert value.shape == target[name].shape, (key, name)
        target[name] = value.clone()
    model.load_state_dict(target)
    return model
