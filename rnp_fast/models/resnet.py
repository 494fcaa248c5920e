"""CIFAR ResNets (ResNet-18/34/50/101/152) with the reference's parameter names.

Layout (pytorch-cifar style, which the RNP reference uses): a 3x3 stride-1 stem `conv1` + `bn1`
with no max-pool, four stages `layer1..layer4` (widths 64/128/256/512, strides 1/2/2/2), global
average pooling and a `linear` classifier. Keeping the names means reference checkpoints load
with `load_state_dict(strict=True)` and mask files line up by layer name.

Pooling: the reference uses `F.avg_pool2d(out, 4)`, which on 32x32 inputs sees exactly the 4x4
final map. `global_average_pool` takes `F.avg_pool2d` with the whole final map as its window:
bit-identical to the reference's call at 32x32 (`adaptive_avg_pool2d` differs by up to 1.8e-7 per
value, which 26 epochs of learning amplify to 9e-4 on the masks), with a deterministic CUDA
backward, and it also works for other image sizes (e.g. the 8x8 digits set).

This module also holds the helpers every architecture shares (`NormLayer`, `scale_channels`,
`global_average_pool`), so the other model files import them from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.models.stages import Stage, blocks_of, run_stages

NormLayer = Callable[[int], nn.Module]
"""Builds a normalisation module for `num_features` channels (default `nn.BatchNorm2d`)."""


def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, C]: the mean over the whole final map (see the module docstring)."""
    return F.avg_pool2d(x, x.shape[-2:]).flatten(1)


class GlobalAveragePool(nn.Module):
    """`global_average_pool` as a layer, keeping its [N, C, 1, 1] shape (for Sequential models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, x.shape[-2:])


def scale_channels(channels: int, width: float) -> int:
    """Channel count for a width multiplier: max(1, round(channels * width))."""
    return max(1, round(channels * width))


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (the following norm layer has the shift)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def projection_shortcut(in_planes: int, out_planes: int, stride: int, norm_layer: NormLayer) -> nn.Sequential:
    """`shortcut` for a residual block: 1x1 conv + norm when the shape changes, else identity.

    The identity is an empty `nn.Sequential` (not `nn.Identity`) to match the reference, whose
    blocks always own a `shortcut` attribute; an empty Sequential returns its input unchanged.
    """
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
        norm_layer(out_planes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.shortcut = projection_shortcut(in_planes, planes, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Out-of-place add: an injected norm layer (e.g. a custom kernel) may save its output for
        # backward, and an in-place `+=` would then trip autograd's version check.
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # stride sits on the 3x3, as in the reference
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_planes)
        self.shortcut = projection_shortcut(in_planes, out_planes, stride, norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet: stem, four stages, global average pool, linear classifier."""

    STAGE_WIDTHS = (64, 128, 256, 512)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, int, int, int],
        num_classes: int = 10,
        width: float = 1.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        widths = [scale_channels(c, width) for c in self.STAGE_WIDTHS]
        self.in_planes = widths[0]
        self.conv1 = conv3x3(3, widths[0])
        self.bn1 = norm_layer(widths[0])
        # Stage strides 1/2/2/2: 32x32 inputs end as a 4x4 map.
        self.layer1 = self._make_layer(block, widths[0], num_blocks[0], 1, norm_layer)
        self.layer2 = self._make_layer(block, widths[1], num_blocks[1], 2, norm_layer)
        self.layer3 = self._make_layer(block, widths[2], num_blocks[2], 2, norm_layer)
        self.layer4 = self._make_layer(block, widths[3], num_blocks[3], 2, norm_layer)
        self.linear = nn.Linear(widths[-1] * block.expansion, num_classes)

    def _make_layer(
        self, block: type[nn.Module], planes: int, num_blocks: int, stride: int, norm_layer: NormLayer
    ) -> nn.Sequential:
        """One stage: only its first block changes stride (and possibly width)."""
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s, norm_layer))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)

    def stages(self) -> list[Stage]:
        """forward as a chain: stem, every block, head (see `stages`)."""
        stem = Stage(lambda x: F.relu(self.bn1(self.conv1(x))), ("conv1", "bn1"))
        head = Stage(lambda x: self.linear(global_average_pool(x)), ("linear",))
        return [stem, *blocks_of(self, "layer1", "layer2", "layer3", "layer4"), head]


def resnet18(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width, norm_layer)


def resnet34(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, width, norm_layer)


def resnet50(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width, norm_layer)


def resnet101(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, width, norm_layer)


def resnet152(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> ResNet:
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes, width, norm_layer)
