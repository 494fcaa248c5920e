"""PreAct-ResNet-18 (He et al. 2016, identity mappings), BackdoorBench's default model.

Parameter names follow BackdoorBench so its checkpoints load strictly: stem `conv1` (no norm:
pre-activation blocks normalise their own input), stages `layer1..layer4` of `PreActBlock`s
(`bn1, conv1, bn2, conv2, shortcut`), a final `bn` + ReLU before pooling (the last block's sum
is otherwise never normalised), and `linear`. Global average pooling takes the whole final map (the 4x4 pool on 32x32
inputs; other sizes work too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.models.resnet import NormLayer, conv3x3, global_average_pool, scale_channels
from rnp_fast.models.stages import Stage, blocks_of, run_stages


class PreActBlock(nn.Module):
    """norm -> ReLU -> conv, twice, with the residual added after the second conv."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        # Projection is a bare 1x1 conv (no norm): its input is already normalised by bn1.
        self.projects = stride != 1 or in_planes != planes
        self.shortcut = nn.Sequential()
        if self.projects:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # A projection sees the pre-activated tensor; the identity path carries the raw input.
        shortcut = self.shortcut(out) if self.projects else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for 32x32 inputs: stem conv, four stages, final norm, linear."""

    STAGE_WIDTHS = (64, 128, 256, 512)

    def __init__(
        self,
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        width: float = 1.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        widths = [scale_channels(c, width) for c in self.STAGE_WIDTHS]
        self.in_planes = widths[0]
        self.conv1 = conv3x3(3, widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], 1, norm_layer)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], 2, norm_layer)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], 2, norm_layer)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], 2, norm_layer)
        self.bn = norm_layer(widths[3])
        self.linear = nn.Linear(widths[3], num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int, norm_layer: NormLayer) -> nn.Sequential:
        """One stage: only its first block changes stride (and possibly width)."""
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s, norm_layer))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)

    def stages(self) -> list[Stage]:
        """forward as a chain: stem, every block, head (see `stages`)."""
        stem = Stage(self.conv1, ("conv1",))
        head = Stage(lambda x: self.linear(global_average_pool(F.relu(self.bn(x)))), ("bn", "linear"))
        return [stem, *blocks_of(self, "layer1", "layer2", "layer3", "layer4"), head]


def preactresnet18(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> PreActResNet:
    return PreActResNet((2, 2, 2, 2), num_classes, width, norm_layer)
