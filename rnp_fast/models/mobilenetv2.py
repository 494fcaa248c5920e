"""MobileNetV2 (Sandler et al. 2018), CIFAR variant with pytorch-cifar's parameter names.

Differences from the ImageNet network, for 32x32 inputs: the stem conv and the second stage use
stride 1 (ImageNet: 2 and 2), so the total downsampling is 8x and the last map is 4x4. Names:
`conv1, bn1` (stem), `layers` (a Sequential of inverted-residual `Block`s with `conv1, bn1,
conv2, bn2, conv3, bn3, shortcut`), `conv2, bn2` (1x1 to 1280 channels), `linear`. Pooling takes
the whole final map (the reference's 4x4 pool on 32x32 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.models.resnet import NormLayer, conv3x3, global_average_pool, scale_channels
from rnp_fast.models.stages import Stage, blocks_of, run_stages

# (expansion, out_channels, num_blocks, stride) per stage.
MOBILENETV2_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 on ImageNet; 1 keeps resolution on 32x32 CIFAR images
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class Block(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection (no ReLU after it)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = norm_layer(out_planes)
        # The residual exists only at stride 1; when the channels differ there it goes through a
        # 1x1 conv + norm (the reference's choice; the paper drops the residual instead).
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False), norm_layer(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(nn.Module):
    """Stem, seven stages of inverted residuals, 1x1 head to 1280 channels, linear classifier."""

    def __init__(self, num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        stem = scale_channels(STEM_CHANNELS, width)
        head = scale_channels(HEAD_CHANNELS, width)
        self.conv1 = conv3x3(3, stem)  # stride 1 for CIFAR (ImageNet: 2)
        self.bn1 = norm_layer(stem)
        self.layers, last = self._make_layers(stem, width, norm_layer)
        self.conv2 = nn.Conv2d(last, head, kernel_size=1, bias=False)
        self.bn2 = norm_layer(head)
        self.linear = nn.Linear(head, num_classes)

    @staticmethod
    def _make_layers(in_planes: int, width: float, norm_layer: NormLayer) -> tuple[nn.Sequential, int]:
        """All blocks in one flat Sequential (names `layers.0` ... `layers.16`); also the out width."""
        blocks = []
        for expansion, channels, num_blocks, stride in MOBILENETV2_CONFIG:
            out_planes = scale_channels(channels, width)
            for s in [stride] + [1] * (num_blocks - 1):
                blocks.append(Block(in_planes, out_planes, expansion, s, norm_layer))
                in_planes = out_planes
        return nn.Sequential(*blocks), in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)

    def stages(self) -> list[Stage]:
        """forward as a chain: stem, every block, head (see `stages`)."""
        stem = Stage(lambda x: F.relu(self.bn1(self.conv1(x))), ("conv1", "bn1"))
        head = Stage(
            lambda x: self.linear(global_average_pool(F.relu(self.bn2(self.conv2(x))))),
            ("conv2", "bn2", "linear"),
        )
        return [stem, *blocks_of(self, "layers"), head]


def mobilenetv2(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> MobileNetV2:
    return MobileNetV2(num_classes, width, norm_layer)
