"""The learning step of a stage: forward + loss, backward, optimiser step, then an optional update.

`learning.build_stage` is its one caller: the stage's recipe gives the sign and scale of the loss
(unlearning ascends on -CE, recovering descends on alpha * CE, training on CE), the gradient clip
and its name; what runs after the optimiser (recovering's mask clamp, training's per-step LR
schedule) comes as ``after_update``. Which parameters train is the optimiser's business.

This is the one place where a step is accelerated (`EngineSettings`):

- ``compile``: forward + loss is torch.compile'd with ``fullgraph=True`` and static shapes;
  AOTAutograd derives the backward from it. Only full batches take the compiled graph: the last,
  partial batch of an epoch runs eagerly (it is never padded: padding would enter BatchNorm's
  batch statistics), so a step compiles once per process whatever the defense set's size.
- ``cuda_graphs`` with ``compile``: torch.compile's "reduce-overhead" mode (CUDA graph trees).
- ``cuda_graphs`` without ``compile``: forward + loss + backward of a full batch is captured
  once in a CUDA graph and replayed; the optimiser step runs outside the graph, so the learning
  rate schedule keeps working. For a single defense, where compilation (tens of seconds cold)
  would not pay back, this removes most of the launch overhead of small steps.

A step returns (summed loss over the batch, correct predictions), both tensors on the device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast.engine import EngineSettings, autocast, raise_recompile_limit, to_layout
from rnp_fast.loops import LearningStep

if TYPE_CHECKING:
    from rnp_fast.learning import StageRecipe

COMPILED_BEFORE: set[tuple] = set()  # (step, model class, batch) compiled earlier in this process


@dataclass
class StepTimings:
    """First-call seconds of the accelerated step (compilation or capture), and whether this
    process had compiled the same step before (Dynamo's in-process cache: a warm compile). The
    step records them as it runs: they belong to the stage that owns the step."""

    first_call_seconds: float = 0.0
    warm: bool = False


def forward_loss_fn(model: nn.Module, recipe: StageRecipe, engine: EngineSettings, device: torch.device):
    """images, labels -> (loss to minimise, summed CE over the batch, correct predictions)."""

    def forward_loss(images: torch.Tensor, labels: torch.Tensor):
        with autocast(device, engine.amp, cache=False):  # a weight is cast once per step anyway; graphs need it off
            logits = model(to_layout(images, engine))
        loss = F.cross_entropy(logits.float(), labels)
        correct = (logits.argmax(1) == labels).sum()
        return loss * recipe.loss_scale, loss.detach() * len(labels), correct

    return forward_loss


def build_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: StageRecipe,
    engine: EngineSettings,
    batch_size: int | None = None,
    after_update: Callable[[], None] | None = None,
) -> tuple[LearningStep, StepTimings]:
    """The step of ``recipe`` for ``model``, and the timings it records; full batches of
    ``batch_size`` (default: the first batch's size) take the accelerated path of ``engine`` (see
    the module docstring), every other batch runs eagerly."""
    device = next(model.parameters()).device
    eager = forward_loss_fn(model, recipe, engine, device)
    timings = StepTimings()
    if engine.cuda_graphs and not engine.compile:
        full = GraphedStep(eager, model, optimizer, timings)
    else:
        full = plain_step(compiled_forward_loss(eager, model, recipe, engine, batch_size, timings), optimizer)
    partial = plain_step(eager, optimizer)
    full_size = [batch_size]  # None: the first batch's size (only an epoch's last batch is short)

    def step(images: torch.Tensor, labels: torch.Tensor):
        if full_size[0] is None:
            full_size[0] = len(labels)
        run = full if len(labels) == full_size[0] else partial
        loss_sum, correct = run(images, labels)
        if recipe.grad_clip > 0:  # off by default: the reference clips before backward, a no-op
            nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        if after_update is not None:
            after_update()
        # Graphed steps reuse their output memory on the next replay: hand out copies.
        return loss_sum.clone(), correct.clone()

    return step, timings


def plain_step(forward_loss, optimizer):
    """Forward + loss, then backward; returns the batch's (summed loss, correct)."""

    def forward_backward(images, labels):
        scaled, loss_sum, correct = forward_loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaled.backward()
        return loss_sum, correct

    return forward_backward


def compiled_forward_loss(eager, model, recipe: StageRecipe, engine: EngineSettings, batch_size, timings):
    """``eager`` compiled with fullgraph=True for the full batch shape (or ``eager`` itself)."""
    if not engine.compile:
        return eager
    raise_recompile_limit()
    mode = "reduce-overhead" if engine.cuda_graphs else None
    compiled = torch.compile(eager, fullgraph=True, dynamic=False, backend=engine.compile_backend, mode=mode)
    key = (recipe.name, type(model).__qualname__, batch_size, engine.amp, engine.channels_last)
    timings.warm = key in COMPILED_BEFORE
    first = [True]

    def forward_loss(images, labels):
        if not first[0]:
            return compiled(images, labels)
        first[0] = False
        started = time.perf_counter()
        result = compiled(images, labels)
        timings.first_call_seconds = time.perf_counter() - started
        COMPILED_BEFORE.add(key)
        return result

    return forward_loss


class GraphedStep:
    """Forward + loss + backward of one fixed batch shape, captured in a CUDA graph on first use.

    Capture records kernels without running them, so it is preceded by one warm-up pass (which
    allocates, and lets cuDNN choose its algorithms) whose side effects on BatchNorm statistics are
    undone. The gradients live in the graph's memory pool: the optimiser reads them there, so they
    are never reset to None between replays (each replay overwrites them).
    """

    def __init__(self, forward_loss, model: nn.Module, optimizer: torch.optim.Optimizer, timings: StepTimings):
        self.forward_loss, self.model, self.optimizer, self.timings = forward_loss, model, optimizer, timings
        self.graph = None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        if self.graph is None:
            started = time.perf_counter()
            self.capture(images, labels)
            self.timings.first_call_seconds = time.perf_counter() - started
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        for parameter, grad in self.grads:  # an eager partial batch may have replaced them
            parameter.grad = grad
        return self.outputs

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images.clone(), labels.clone()
        buffers = [b.detach().clone() for b in self.model.buffers()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            scaled, _, _ = self.forward_loss(self.images, self.labels)
            scaled.backward()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            scaled, loss_sum, correct = self.forward_loss(self.images, self.labels)
            scaled.backward()
        self.outputs = (loss_sum, correct)
        self.grads = [(p, p.grad) for p in self.model.parameters() if p.grad is not None]
        with torch.no_grad():  # undo the warm-up's BatchNorm statistics (the capture itself ran nothing)
            for buffer, saved in zip(self.model.buffers(), buffers, strict=True):
                buffer.copy_(saved)
