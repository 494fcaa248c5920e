"""Constants shared by test modules."""

TINY_WIDTH = 0.125  # ResNet-18 at 1/8 width: 600 BatchNorm channels, fast on CPU
