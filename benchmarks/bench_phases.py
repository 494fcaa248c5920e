"""pytest-benchmark suites for the pipeline's phases, built from the same pieces `rnp-fast bench` runs.

Each case times one phase on the demo model and data, on CUDA when present (else the CPU), with the
fast engine's settings for that device (`resolve_engine`), against the reference mode's way:

- an unlearning epoch: device-resident loader vs the reference's DataLoader;
- a recovering epoch: masked BatchNorm in PyTorch vs the Triton kernel (CUDA only);
- the pruning sweep over the 19 default thresholds: batched vs sequential vs reference mode;
- one per-epoch evaluation of both test sets: device-resident vs the reference's DataLoader.

    pytest benchmarks/bench_phases.py --benchmark-columns=median,iqr,rounds
    pytest benchmarks/bench_phases.py --benchmark-json=benchmarks/results/phases_<device>.json
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from bench_sweep import random_masks  # benchmarks/ is on sys.path: pytest and scripts put it there

from rnp_fast.attacks import build_trigger
from rnp_fast.checkpoint import load_model_weights
from rnp_fast.config import DataConfig, EngineConfig, RNPConfig
from rnp_fast.data import defense_data, training_loader
from rnp_fast.demo import DEMO_DATA, DEMO_MODEL, DEMO_RNP, demo_checkpoint
from rnp_fast.engine import EngineSettings, prepare_model, resolve_engine
from rnp_fast.evaluate import build_test_sets
from rnp_fast.loaders.sources import load_source
from rnp_fast.loops import run_epoch
from rnp_fast.masked_bn import MaskedBatchNorm2d
from rnp_fast.models import build_model
from rnp_fast.prune import rank_channels, threshold_schedule
from rnp_fast.pruning_eval import SweepOptions, make_evaluator, score_steps
from rnp_fast.recover import prepare_masked_model, recover_step
from rnp_fast.unlearn import unlearn_step

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = dict(rounds=3, warmup_rounds=1, iterations=1)


@pytest.fixture(scope="module")
def demo():
    source = load_source("digits")
    model = build_model(DEMO_MODEL.arch, source.num_classes, DEMO_MODEL.width)
    model = load_model_weights(model, demo_checkpoint(), DEMO_MODEL.arch).to(DEVICE)
    data = DataConfig(**DEMO_DATA)
    trigger = build_trigger("badnets", image_size=32, channels=3)
    tests = build_test_sets(source.test, trigger, "all2one", 0, 10, source.mean, source.std, DEVICE)
    return source, model, data, defense_data(source, data).train, tests


def engine(mode: str) -> EngineSettings:
    return resolve_engine(EngineConfig(device=DEVICE.type, mode=mode), DEVICE)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_unlearn_epoch(benchmark, demo, mode):
    source, model, data, train, _ = demo
    loader = training_loader(train, source, data, EngineConfig(mode=mode), DEVICE)
    work = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(work.parameters(), lr=DEMO_RNP["unlearning_lr"], momentum=0.9)
    step = unlearn_step(work, optimizer, 0.0, engine(mode))
    benchmark.pedantic(lambda: run_epoch(loader, step, loader.num_images, 0, 0.0), **ROUNDS)


@pytest.mark.parametrize("bn_kernel", ["torch", "triton"])
def test_recover_epoch(benchmark, demo, bn_kernel):
    if bn_kernel == "triton" and DEVICE.type != "cuda":
        pytest.skip("the Triton kernel runs on CUDA")
    source, model, data, train, _ = demo
    loader = training_loader(train, source, data, EngineConfig(mode="fast"), DEVICE)
    masked = build_model(DEMO_MODEL.arch, 10, DEMO_MODEL.width, MaskedBatchNorm2d).to(DEVICE)
    masks = prepare_masked_model(masked, model)
    optimizer = torch.optim.SGD(masks, lr=DEMO_RNP["recovering_lr"], momentum=0.9)
    settings = dataclasses.replace(engine("fast"), bn_kernel=bn_kernel)
    prepare_model(masked, settings)
    step = recover_step(masked, optimizer, RNPConfig().alpha, settings)
    benchmark.pedantic(lambda: run_epoch(loader, step, loader.num_images, 1, 0.0), **ROUNDS)


@pytest.mark.parametrize("provider", ["batched", "sequential", "reference"])
def test_pruning_sweep(benchmark, demo, provider):
    _, model, data, _, tests = demo
    steps = threshold_schedule(rank_channels(random_masks(model)), 0.90, 0.05)
    settings = engine("fast")
    options = SweepOptions(
        mode="reference" if provider == "reference" else "fast",
        sweep_mode="sequential" if provider == "sequential" else "batched",
        batch_size=settings.eval_rows or data.eval_batch_size,
        amp=settings.amp,
        channels_last=settings.eval_channels_last,
    )
    if provider == "reference":
        options.batch_size, options.channels_last = data.eval_batch_size, False
    benchmark.pedantic(lambda: score_steps(model, steps, tests, options), **ROUNDS)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_epoch_evaluation(benchmark, demo, mode):
    _, model, data, _, tests = demo
    settings = engine(mode)
    evaluator = make_evaluator(mode, tests, settings.eval_rows or data.eval_batch_size, settings.eval_channels_last)
    benchmark.pedantic(lambda: evaluator(model), **ROUNDS)
