"""The stage builder (`rnp_fast.learning`): recipes from the configuration, and what each stage's
build trains, clamps and schedules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig, TrainConfig
from rnp_fast.learning import build_stage, recover_recipe, train_recipe, unlearn_recipe
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d, masked_batchnorm_layers
from rnp_fast.models import build_model
from rnp_fast.resolved import resolve_run

WIDTH = 0.125


def batch(seed: int = 0, size: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(size, 3, 16, 16, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def test_recipes_take_every_setting_from_the_configuration():
    rnp = RNPConfig(unlearning_lr=0.03, recovering_lr=0.4, momentum=0.8, weight_decay=1e-3, alpha=0.5, grad_clip=2.0)
    unlearn, recover = unlearn_recipe(rnp), recover_recipe(rnp)
    assert (unlearn.lr, unlearn.momentum, unlearn.weight_decay, unlearn.loss_scale, unlearn.grad_clip) == (
        0.03,
        0.8,
        1e-3,
        -1.0,
        2.0,
    )
    assert (recover.lr, recover.momentum, recover.weight_decay, recover.loss_scale, recover.masks_only) == (
        0.4,
        0.8,
        0.0,
        0.5,
        True,
    )
    train = train_recipe(TrainConfig(lr=0.05, momentum=0.7, weight_decay=2e-4), steps_per_epoch=3)
    assert (train.lr, train.momentum, train.weight_decay, train.nesterov, train.schedule_per_step) == (
        0.05,
        0.7,
        2e-4,
        True,
        True,
    )


def test_recovering_trains_only_the_masks_and_clamps_them_into_0_1():
    torch.manual_seed(0)
    unlearned = build_model("preactresnet18", 10, WIDTH)
    masked = build_model("preactresnet18", 10, WIDTH, MaskedBatchNorm2d)
    stage = build_stage(recover_recipe(RNPConfig(recovering_lr=50.0)), masked, weights=unlearned)
    weights = {
        k: v.clone()
        for k, v in masked.state_dict().items()
        if not k.endswith(("neuron_mask", "running_mean", "running_var", "num_batches_tracked"))
    }
    for _ in range(3):
        stage.step(*batch())
    masks = torch.cat([layer.neuron_mask.detach() for _, layer in masked_batchnorm_layers(masked)])
    assert masks.min() >= 0 and masks.max() <= 1 and not torch.all(masks == 1)  # moved, and clamped
    state = masked.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())  # nothing else trained
    assert [p for group in stage.optimizer.param_groups for p in group["params"]] == [
        layer.neuron_mask for _, layer in masked_batchnorm_layers(masked)
    ]


def test_unlearning_steps_its_schedule_per_epoch_and_training_per_step():
    class OneBatch:
        batch_size, num_images = 8, 8

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            yield batch()

    loader = OneBatch()
    torch.manual_seed(0)
    unlearn = build_stage(unlearn_recipe(RNPConfig(schedule=(1,))), build_model("preactresnet18", 10, WIDTH))
    assert [unlearn.epoch(loader, epoch).lr for epoch in range(3)] == pytest.approx([0.01, 0.001, 0.001])
    train_config = TrainConfig(epochs=4, lr=0.1, lr_schedule="multistep")  # x0.1 after steps 2 and 3 of 4
    train = build_stage(train_recipe(train_config, steps_per_epoch=1), build_model("preactresnet18", 10, WIDTH))
    assert [train.epoch(loader, epoch).lr for epoch in range(4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


def test_a_resolved_run_is_frozen():
    run = resolve_run(
        ModelConfig(width=WIDTH), DataConfig(dataset="digits"), AttackConfig(), EngineConfig(device="cpu")
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.engine_config = EngineConfig(scoring="sequential")  # type: ignore[misc]
    assert run.scoring().scoring == "batched" and isinstance(run.build(nn.BatchNorm2d), nn.Module)
