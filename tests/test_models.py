"""Model zoo: shapes, reference parameter names and counts, width scaling, norm-layer injection.

Full-width models are built on the meta device: construction and counting need no memory or
initialisation time, which keeps ResNet-152 and VGG-19 cheap on a 2-core CI machine. Only the
width-0.125 models run a forward pass.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rnp_fast.errors import UserError
from rnp_fast.models import ARCHITECTURES, build_model
from rnp_fast.models.resnet import scale_channels

ALL_ARCHS = sorted(ARCHITECTURES)
SMALL = 0.125

# (parameters, norm channels) at width 1.0 with 10 classes. The parameter counts agree with the
# figures published for pytorch-cifar's models (ResNet-18 11,173,962 is also derived in closed
# form below); PreAct-ResNet-18 is pytorch-cifar's 11,171,146 plus BackdoorBench's final
# BatchNorm(512) (1,024 parameters).
FULL_WIDTH_COUNTS = {
    "resnet18": (11_173_962, 4_800),
    "resnet34": (21_282_122, 8_512),
    "resnet50": (23_520_842, 26_560),
    "resnet101": (42_512_970, 52_672),
    "resnet152": (58_156_618, 75_712),
    "preactresnet18": (11_172_170, 3_904),
    "vgg19_bn": (20_040_522, 5_504),
    "mobilenetv2": (2_296_922, 17_544),
}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def norm_channels(model: nn.Module) -> int:
    return sum(m.num_features for m in model.modules() if isinstance(m, _BatchNorm))


def build_on_meta(arch: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_model(arch, **kwargs)


class TaggedBatchNorm2d(nn.BatchNorm2d):
    """Stand-in for an injected norm layer (e.g. RNP's masked BatchNorm)."""


def test_registry_names() -> None:
    expected = {
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "preactresnet18", "vgg19_bn", "mobilenetv2",
    }  # fmt: skip
    assert set(ARCHITECTURES) == expected


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_small_model_forward_and_backward(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=7, width=SMALL)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    # Every parameter takes part in the forward pass (no dead branches).
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_full_width_counts(arch: str) -> None:
    model = build_on_meta(arch)
    assert (num_params(model), norm_channels(model)) == FULL_WIDTH_COUNTS[arch]


def test_resnet18_parameter_count_closed_form() -> None:
    """11,173,962 from the architecture itself, independently of the module code."""

    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:  # weight + bias
        return 2 * c

    def basic_block(cin: int, cout: int) -> int:
        shortcut = conv(cin, cout, 1) + bn(cout) if cin != cout else 0
        return conv(cin, cout) + bn(cout) + conv(cout, cout) + bn(cout) + shortcut

    widths = [64, 64, 128, 256, 512]
    stages = sum(basic_block(cin, cout) + basic_block(cout, cout) for cin, cout in pairwise(widths))
    expected = conv(3, 64) + bn(64) + stages + 512 * 10 + 10
    assert expected == 11_173_962
    assert num_params(build_on_meta("resnet18")) == expected


def test_resnet18_norm_channels_and_width_scaling() -> None:
    assert norm_channels(build_on_meta("resnet18")) == 4_800
    assert norm_channels(build_on_meta("resnet18", width=SMALL)) == 600


def test_resnet18_state_dict_keys_match_reference() -> None:
    keys = set(build_on_meta("resnet18").state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer4.1.bn2.weight", "layer2.0.shortcut.1.weight"):
        assert key in keys
    assert "linear.bias" in keys
    # Identity shortcuts are empty and the stem has no max-pool or extra norm.
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)


@pytest.mark.parametrize(
    ("arch", "keys"),
    [
        (
            "preactresnet18",
            ["conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "bn.weight"],
        ),
        ("vgg19_bn", ["features.0.weight", "features.0.bias", "features.1.running_var", "classifier.weight"]),
        ("mobilenetv2", ["bn1.weight", "layers.16.conv3.weight", "layers.0.shortcut.1.weight", "bn2.weight"]),
    ],
)
def test_other_archs_state_dict_keys(arch: str, keys: list[str]) -> None:
    state = build_on_meta(arch).state_dict()
    assert set(keys) <= set(state)
    assert "linear.weight" in state or "classifier.weight" in state


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_injected_norm_layer_replaces_every_batchnorm(arch: str) -> None:
    created: list[int] = []

    def norm_layer(num_features: int) -> nn.Module:
        created.append(num_features)
        return TaggedBatchNorm2d(num_features)

    model = build_on_meta(arch, width=SMALL, norm_layer=norm_layer)
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert norms and all(type(m) is TaggedBatchNorm2d for m in norms)
    assert sum(created) == norm_channels(build_on_meta(arch, width=SMALL))


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_non_batchnorm_norm_layer_leaves_no_batchnorm(arch: str) -> None:
    """A norm that is not a BatchNorm at all: any hard-coded nn.BatchNorm2d would remain."""
    model = build_on_meta(arch, width=SMALL, norm_layer=lambda c: nn.GroupNorm(1, c))
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())


def test_unknown_arch_raises_user_error_listing_names() -> None:
    with pytest.raises(UserError) as info:
        build_model("resnet19")
    message = str(info.value)
    assert "\n" not in message
    assert "resnet19" in message
    assert all(name in message for name in ALL_ARCHS)


@pytest.mark.parametrize("width", [0.0, -1.0, math.nan])
def test_bad_width_raises_user_error(width: float) -> None:
    with pytest.raises(UserError, match="width"):
        build_model("resnet18", width=width)


@pytest.mark.parametrize("num_classes", [1, 0, -3])
def test_bad_num_classes_raises_user_error(num_classes: int) -> None:
    with pytest.raises(UserError, match="num_classes"):
        build_model("resnet18", num_classes=num_classes)


@pytest.mark.parametrize(
    ("channels", "width", "expected"),
    [(64, 1.0, 64), (64, 0.125, 8), (512, 0.5, 256), (100, 0.333, 33), (64, 0.001, 1)],
)
def test_scale_channels(channels: int, width: float, expected: int) -> None:
    assert scale_channels(channels, width) == expected


def test_resnet_accepts_other_image_sizes() -> None:
    """Adaptive pooling: 8x8 inputs (the embedded digits set) reach the classifier as 1x1."""
    model = build_model("resnet18", width=SMALL).eval()
    with torch.no_grad():
        assert model(torch.randn(3, 3, 8, 8)).shape == (3, 10)
