"""The stage builder: the one place a learning stage (unlearn, recover, train) is set up.

A `StageRecipe` says what differs between the stages, all of it from the configuration: the SGD
settings, the sign and scale of the loss (unlearning ascends on -CE, recovering descends on
alpha * CE, training on CE), the gradient clip, which parameters train (recovering: only the
masks, clamped into [0, 1] after every step) and the learning-rate schedule (unlearning's per
epoch, training's per step). `build_stage` takes a recipe, the model and the resolved engine and
returns a `LearningStage`: the model prepared (layout, BatchNorm kernel, frozen parameters), its
optimizer and schedule, and its step (compiled, CUDA-graphed or eager: `steps`).

The product (`unlearn`, `recover`, `train`), the compiled-graph test (`graph_count`), the GPU probe
and the kernel benchmark all build their steps here, so they all measure the step the product runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from rnp_fast.config import RNPConfig, TrainConfig
from rnp_fast.engine import EAGER, EngineSettings, apply_engine
from rnp_fast.loops import EpochStats, LearningStep, current_lr, run_epoch
from rnp_fast.masked_batchnorm import mask_clamp, masked_batchnorm_layers
from rnp_fast.steps import StepTimings, build_step

Schedule = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


@dataclass(frozen=True)
class StageRecipe:
    name: str  # unlearn, recover or train: names the compiled step in logs and timings
    lr: float
    momentum: float
    weight_decay: float = 0.0
    nesterov: bool = False
    loss_scale: float = 1.0  # the loss minimised is loss_scale * CE (-1: gradient ascent)
    grad_clip: float = 0.0  # gradient-norm clip; 0 = off
    masks_only: bool = False  # only the masked BatchNorms' masks train, clamped into [0, 1]
    schedule: Schedule | None = field(default=None, compare=False)
    schedule_per_step: bool = False  # the schedule steps after every optimiser step, else every epoch


def unlearn_recipe(rnp: RNPConfig) -> StageRecipe:
    """Gradient ascent on every parameter; the learning rate x0.1 at each milestone epoch."""
    milestones = partial(torch.optim.lr_scheduler.MultiStepLR, milestones=list(rnp.schedule), gamma=0.1)
    return StageRecipe(
        "unlearn", rnp.unlearning_lr, rnp.momentum, rnp.weight_decay, False, -1.0, rnp.grad_clip, schedule=milestones
    )


def recover_recipe(rnp: RNPConfig) -> StageRecipe:
    return StageRecipe("recover", rnp.recovering_lr, rnp.momentum, loss_scale=rnp.alpha, masks_only=True)


def train_recipe(train: TrainConfig, steps_per_epoch: int) -> StageRecipe:
    """Nesterov SGD on every parameter, the schedule stepped after every step."""
    schedule = partial(train_schedule, train=train, steps_per_epoch=steps_per_epoch)
    return StageRecipe(
        "train", train.lr, train.momentum, train.weight_decay, True, schedule=schedule, schedule_per_step=True
    )


def train_schedule(optimizer, train: TrainConfig, steps_per_epoch: int):
    total = train.epochs * steps_per_epoch
    if train.lr_schedule == "onecycle":  # short warm-up then annealing: fast, stable training
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=total)
    if train.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    milestones = [int(total * 0.5), int(total * 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


@dataclass
class LearningStage:
    """A prepared stage: train ``model`` with ``epoch(loader, n)``, or call ``step`` directly."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: LearningStep
    timings: StepTimings  # the accelerated step's first call, and whether it came warm
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    schedule_per_step: bool = False

    def epoch(self, loader, epoch: int) -> EpochStats:
        """One pass over ``loader``'s epoch ``epoch`` in train mode; an epoch schedule steps after it."""
        loader.set_epoch(epoch)
        self.model.train()
        stats = run_epoch(loader, self.step, loader.num_images, epoch, current_lr(self.optimizer))
        if self.scheduler is not None and not self.schedule_per_step:
            self.scheduler.step()
        return stats


def build_stage(
    recipe: StageRecipe,
    model: nn.Module,
    engine: EngineSettings = EAGER,
    batch_size: int | None = None,
    sample: torch.Tensor | None = None,
    weights: nn.Module | None = None,
) -> LearningStage:
    """Prepare ``model`` (trained in place) for ``recipe`` under ``engine``. ``batch_size``: the
    full batch that takes the accelerated path (default: the first batch's size); ``sample``: one
    input batch, which tells the `auto` BatchNorm kernel choice the shapes; ``weights``: a model
    whose weights ``model`` starts from (recovering: the unlearned model; the masks stay at 1)."""
    if weights is not None:
        load_weights(model, weights)
    parameters = freeze_all_but_masks(model) if recipe.masks_only else list(model.parameters())
    apply_engine(model.train(), engine, sample)
    optimizer = sgd(parameters, recipe)
    scheduler = recipe.schedule(optimizer) if recipe.schedule is not None else None
    after_update = mask_clamp(parameters, engine) if recipe.masks_only else None
    if recipe.schedule_per_step:
        after_update = scheduler.step
    step, timings = build_step(model, optimizer, recipe, engine, batch_size, after_update)
    return LearningStage(model, optimizer, step, timings, scheduler, recipe.schedule_per_step)


def load_weights(model: nn.Module, weights: nn.Module) -> None:
    """``weights``' state into ``model``, whose only extra entries may be masks."""
    missing, unexpected = model.load_state_dict(weights.state_dict(), strict=False)
    assert not unexpected and all(key.endswith("neuron_mask") for key in missing), (missing, unexpected)


def freeze_all_but_masks(model: nn.Module) -> list[nn.Parameter]:
    """Only the masks train: every other parameter is frozen; returns the masks, in module order."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    masks = [layer.neuron_mask for _, layer in masked_batchnorm_layers(model)]
    for mask in masks:
        mask.requires_grad_(True)
    return masks


def sgd(parameters: list[nn.Parameter], recipe: StageRecipe) -> torch.optim.SGD:
    """SGD with one fused kernel for the whole update on CUDA (no per-parameter launches)."""
    options = {"lr": recipe.lr, "momentum": recipe.momentum, "weight_decay": recipe.weight_decay}
    fused = {"fused": True} if parameters[0].device.type == "cuda" else {}
    return torch.optim.SGD(parameters, nesterov=recipe.nesterov, **options, **fused)
