"""The compiled learning steps are one graph each, with no graph break and no recompile.

Every step of `rnp_fast.steps` (unlearn, recover, train) is compiled with ``fullgraph=True``
(a graph break would raise) and counted with Dynamo's counting backend (graph capture without
Inductor code generation, so the file runs in seconds). Three epochs of 20 images in batches of 8
(8, 8, 4): the full batches take the compiled graph, the partial last batch runs eagerly, and
nothing is compiled again after the first epoch. Unlearning and training run the plain BatchNorm
model (only recovering has masked BatchNorms); recovering runs with both BatchNorm kernels:
PyTorch's and the fused masked-BatchNorm operator (its PyTorch implementation on the CPU). The steps
and the count come from `rnp_fast.graph_count`, which the GPU probe runs on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from rnp_fast.engine import EngineSettings
from rnp_fast.graph_count import CASES, EPOCHS, EXPECTED_GRAPHS, batches, case_engine, graphs_per_epoch, stage_step


@pytest.mark.parametrize(("stage", "precision", "layout", "kernel"), CASES)
def test_each_step_is_one_graph_and_never_recompiles(stage, precision, layout, kernel):
    counter = CompileCounter()
    counts = graphs_per_epoch(stage, case_engine(precision, layout, kernel, counter), counter)
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
