"""VGG-19 with BatchNorm, CIFAR variant (pytorch-cifar layout and parameter names).

`features` is one flat Sequential: per conv layer Conv2d(3x3, padding 1) + norm + ReLU, and a
MaxPool2d(2, 2) at each 'M'; so the first norm is `features.1` and reference checkpoints load
strictly. Convs keep their bias, as in the reference (their shift is redundant with the norm's
but removing it would change the state-dict keys). The classifier is a single Linear on the
512-channel vector.

Five 2x2 max-pools take 32x32 down to 1x1; the reference then applies a no-op 1x1 average pool.
We end `features` with AdaptiveAvgPool2d(1) in the same slot instead: identical on 32x32 (and
parameter-free, so keys are unchanged), and it also accepts other input sizes (>= 32 pixels, as
the five pools need at least 1 pixel left).
"""

from __future__ import annotations

import torch
from torch import nn

from rnp_fast.models.resnet import GlobalAveragePool, NormLayer, scale_channels
from rnp_fast.models.stages import Stage, blocks_of, run_stages

VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M",
    128, 128, "M",
    256, 256, 256, 256, "M",
    512, 512, 512, 512, "M",
    512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """Plain conv stack (`features`) then a linear `classifier`."""

    def __init__(
        self,
        config: tuple[int | str, ...],
        num_classes: int = 10,
        width: float = 1.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.features = self._make_features(config, width, norm_layer)
        last_channels = scale_channels(next(c for c in reversed(config) if c != "M"), width)
        self.classifier = nn.Linear(last_channels, num_classes)

    @staticmethod
    def _make_features(config: tuple[int | str, ...], width: float, norm_layer: NormLayer) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_channels = 3
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = scale_channels(int(item), width)
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                norm_layer(out_channels),
                nn.ReLU(),  # not in-place: an injected norm layer may save its output for backward
            ]
            in_channels = out_channels
        layers.append(GlobalAveragePool())
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(), x)

    def stages(self) -> list[Stage]:
        """forward as a chain: every layer of `features`, then the classifier (see `stages`)."""
        head = Stage(lambda x: self.classifier(x.flatten(1)), ("classifier",))
        return [*blocks_of(self, "features"), head]


def vgg19_bn(num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d) -> VGG:
    return VGG(VGG19_CONFIG, num_classes, width, norm_layer)
