"""The compiled learning steps are one graph each, with no graph break and no recompile.

Every step of `rnp_fast.steps` (unlearn, recover, train) is compiled with ``fullgraph=True``
(a graph break would raise) and counted with Dynamo's counting backend (graph capture without
Inductor code generation, so the file runs in seconds). Three epochs of 20 images in batches of 8
(8, 8, 4): the full batches take the compiled graph, the partial last batch runs eagerly, and
nothing is compiled again after the first epoch. Unlearning and training run the plain BatchNorm
model (only recovering has masked BatchNorms); recovering runs with both BatchNorm kernels:
PyTorch's and the fused masked-BatchNorm operator (its PyTorch implementation on the CPU).
"""

from __future__ import annotations

import pytest
import torch
from tests_support import TINY_WIDTH
from torch._dynamo.testing import CompileCounter

from rnp_fast.engine import EngineSettings, apply_engine, sgd
from rnp_fast.masked_bn import MaskedBatchNorm2d, mask_clamp
from rnp_fast.models import build_model
from rnp_fast.steps import TRAIN, make_step, recover_recipe, unlearn_recipe

CPU = torch.device("cpu")
BATCH, IMAGES, EPOCHS = 8, 20, 3
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def batches(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(IMAGES, 3, 16, 16, generator=generator)  # small maps: CPU time
    labels = torch.randint(0, 10, (IMAGES,), generator=generator)
    return [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, IMAGES, BATCH)]


def stage_step(stage: str, engine: EngineSettings, arch: str = "preactresnet18"):
    """The step of ``stage`` on a tiny zoo model, built as unlearn / recover / train build it."""
    torch.manual_seed(0)
    if stage == "recover":
        model = build_model(arch, 10, TINY_WIDTH, MaskedBatchNorm2d).train()
        apply_engine(model, engine)
        masks = [p for name, p in model.named_parameters() if name.endswith("neuron_mask")]
        optimizer = sgd(masks, CPU, lr=0.2, momentum=0.9)
        return make_step(model, optimizer, recover_recipe(0.2), engine, BATCH, mask_clamp(masks, engine))
    model = apply_engine(build_model(arch, 10, TINY_WIDTH).train(), engine)
    optimizer = sgd(model.parameters(), CPU, lr=0.01, momentum=0.9)
    recipe = unlearn_recipe() if stage == "unlearn" else TRAIN
    return make_step(model, optimizer, recipe, engine, BATCH)


def graphs_per_epoch(stage: str, engine: EngineSettings, counter: CompileCounter, arch: str = "preactresnet18"):
    torch._dynamo.reset()
    step = stage_step(stage, engine, arch)
    counts = []
    for _ in range(EPOCHS):
        for images, labels in batches():
            loss, correct = step(images, labels)
            assert torch.isfinite(loss) and 0 <= int(correct) <= len(labels)
        counts.append(counter.frame_count)
    return counts


# one compiled forward + loss per step; recovering also compiles its mask clamp
EXPECTED_GRAPHS = {"unlearn": 1, "train": 1, "recover": 2}
CASES = [
    (stage, precision, layout, kernel)
    for stage in ("unlearn", "recover", "train")
    for precision in PRECISIONS
    for layout in ("nchw", "channels_last")
    for kernel in (("torch", "fused") if stage == "recover" else ("torch",))
]


@pytest.mark.parametrize(("stage", "precision", "layout", "kernel"), CASES)
def test_each_step_is_one_graph_and_never_recompiles(stage, precision, layout, kernel):
    counter = CompileCounter()
    engine = EngineSettings(
        compile=True,
        amp=PRECISIONS[precision],
        channels_last=layout == "channels_last",
        bn_kernel="triton" if kernel == "fused" else "torch",
        compile_backend=counter,
    )
    counts = graphs_per_epoch(stage, engine, counter)
    assert counts == [EXPECTED_GRAPHS[stage]] * EPOCHS  # first epoch compiles, later ones reuse


def test_the_fused_operator_is_inside_the_recover_graph():
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    engine = EngineSettings(compile=True, bn_kernel="triton", compile_backend=capture)
    torch._dynamo.reset()
    step = stage_step("recover", engine)
    images, labels = batches()[0]
    step(images, labels)
    code = graphs[0].code
    assert "rnp_fast.masked_bn" in code and "batch_norm" not in code.replace("masked_bn", "")


def test_resnet18_recover_step_is_one_graph():
    counter = CompileCounter()
    engine = EngineSettings(compile=True, compile_backend=counter)  # the zoo's main model, as its stages run
    assert graphs_per_epoch("recover", engine, counter, arch="resnet18") == [2] * EPOCHS


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["unlearn", "recover", "train"])
def test_inductor_compiled_step_matches_eager(stage):
    """Inductor's code for each step: same losses as eager within float32 reordering."""
    torch._dynamo.reset()
    losses = {}
    for name, engine in {"eager": EngineSettings(), "inductor": EngineSettings(compile=True)}.items():
        step = stage_step(stage, engine)
        losses[name] = torch.stack([step(images, labels)[0] for images, labels in batches()])
    assert torch.allclose(losses["eager"], losses["inductor"], rtol=1e-3, atol=1e-3)
