"""Counting the graphs of the compiled learning steps: each step must be one graph, never recompiled.

Every step of `rnp_fast.steps` (unlearn, recover, train) is compiled with ``fullgraph=True`` (a
graph break raises) and counted with a backend of the caller's (e.g. Dynamo's ``CompileCounter``:
graph capture without code generation, so a count takes seconds). Three epochs of 20 images in
batches of 8 (8, 8, 4): the full batches take the compiled graph, the partial last batch runs
eagerly, and nothing may compile again after the first epoch. Unlearning and training run the
plain BatchNorm model; recovering runs the masked model with the BatchNorm kernel of the engine.

The steps come from the stage builder (`learning.build_stage`) with the default configuration's
recipes, so the count is of the step the product runs. Shared by ``tests/test_compile_graphs.py``
(on the CPU) and ``benchmarks/gpu_probe.py`` (on the GPU, where the fused operator is the Triton one).
"""

from __future__ import annotations

import torch
from torch import nn

from rnp_fast.config import RNPConfig, TrainConfig
from rnp_fast.engine import EngineSettings
from rnp_fast.learning import StageRecipe, build_stage, recover_recipe, train_recipe, unlearn_recipe
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d
from rnp_fast.models import build_model

CPU = torch.device("cpu")
BATCH, IMAGES, EPOCHS = 8, 20, 3
TINY_WIDTH = 0.125
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
STAGES = ("unlearn", "recover", "train")
# one compiled forward + loss per step; recovering also compiles its mask clamp
EXPECTED_GRAPHS = {"unlearn": 1, "train": 1, "recover": 2}
# (stage, precision, layout, BatchNorm kernel): only recovering has masked BatchNorms
CASES = [
    (stage, precision, layout, kernel)
    for stage in STAGES
    for precision in PRECISIONS
    for layout in ("nchw", "channels_last")
    for kernel in (("torch", "fused") if stage == "recover" else ("torch",))
]


def case_engine(precision: str, layout: str, kernel: str, backend) -> EngineSettings:
    """The compiled engine of one case, compiling with ``backend``."""
    return EngineSettings(
        compile=True,
        amp=PRECISIONS[precision],
        channels_last=layout == "channels_last",
        bn_kernel="triton" if kernel == "fused" else "torch",
        compile_backend=backend,
    )


def batches(seed: int = 0, device: torch.device = CPU, size: int = 16):
    """Seeded random images (``size`` pixels per side: small maps keep CPU time down) in batches."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(IMAGES, 3, size, size, generator=generator).to(device)
    labels = torch.randint(0, 10, (IMAGES,), generator=generator).to(device)
    return [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, IMAGES, BATCH)]


def stage_recipe(stage: str) -> StageRecipe:
    """The product's recipe of ``stage`` with the default configuration's settings."""
    if stage == "unlearn":
        return unlearn_recipe(RNPConfig())
    if stage == "recover":
        return recover_recipe(RNPConfig())
    return train_recipe(TrainConfig(), steps_per_epoch=-(-IMAGES // BATCH))


def stage_step(
    stage: str,
    engine: EngineSettings,
    arch: str = "preactresnet18",
    device: torch.device = CPU,
    width: float = TINY_WIDTH,
):
    """The step of ``stage`` on a zoo model, from the stage builder the product uses."""
    torch.manual_seed(0)
    norm_layer = MaskedBatchNorm2d if stage == "recover" else nn.BatchNorm2d
    model = build_model(arch, 10, width, norm_layer).to(device)
    return build_stage(stage_recipe(stage), model, engine, BATCH).step


def graphs_per_epoch(stage: str, engine: EngineSettings, counter, arch: str = "preactresnet18", **model) -> list[int]:
    """The counter's graph count after each of the three epochs (``model``: stage_step's device
    and width; ``size``: the image side)."""
    size = model.pop("size", 16)
    torch._dynamo.reset()
    step = stage_step(stage, engine, arch, **model)
    counts = []
    for _ in range(EPOCHS):
        for images, labels in batches(device=model.get("device", CPU), size=size):
            loss, correct = step(images, labels)
            if not (torch.isfinite(loss) and 0 <= int(correct) <= len(labels)):
                raise AssertionError(f"{stage} step: loss {float(loss)}, {int(correct)} correct of {len(labels)}")
        counts.append(counter.frame_count)
    return counts
