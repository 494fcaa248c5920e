"""Model zoo: CIFAR classifiers with reference-compatible parameter names.

Every builder takes `num_classes`, `width` (channel multiplier, channels = max(1, round(c * width))
for every stage, so tiny CPU test models and full-size ones share one definition) and
`norm_layer` (num_features -> module, used for EVERY BatchNorm2d, so RNP can swap in its masked
BatchNorm at construction time instead of patching modules afterwards).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rnp_fast.errors import UserError
from rnp_fast.models.mobilenetv2 import MobileNetV2, mobilenetv2
from rnp_fast.models.preact_resnet import PreActResNet, preactresnet18
from rnp_fast.models.resnet import NormLayer, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152
from rnp_fast.models.vgg import VGG, vgg19_bn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "preactresnet18": preactresnet18,
    "vgg19_bn": vgg19_bn,
    "mobilenetv2": mobilenetv2,
}


def build_model(
    arch: str, num_classes: int = 10, width: float = 1.0, norm_layer: NormLayer = nn.BatchNorm2d
) -> nn.Module:
    """Build `arch` by name; bad arguments raise `UserError` with a one-line message."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}")
    if not width > 0:  # also rejects NaN
        raise UserError(f"width must be > 0, got {width}")
    if num_classes < 2:
        raise UserError(f"num_classes must be >= 2, got {num_classes}")
    return ARCHITECTURES[arch](num_classes=num_classes, width=width, norm_layer=norm_layer)


__all__ = [
    "ARCHITECTURES",
    "VGG",
    "MobileNetV2",
    "NormLayer",
    "PreActResNet",
    "ResNet",
    "build_model",
]
