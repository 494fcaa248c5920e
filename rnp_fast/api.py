"""The Python API: defend any PyTorch model with BatchNorm2d layers, from tensors or a Dataset.

    result = rnp_fast.defend(model, defense=(images, labels), mean=..., std=..., test=..., poisoned=...)

This is the CLI's defense, not a second one: the caller's objects replace the CLI's files at the
seams `resolve_run` offers (the data source, the model factory, the test sets), and the defense
runs through `defense.compute_defense`, the code the CLI runs, with the same config dataclasses
and defaults. The model factory copies the caller's model and swaps its BatchNorm layers
(`models.swap`); the caller's model itself is never touched. ``result.save(out)`` writes the
CLI's run directory, through `outputs.RunDirectory` like every other write.

Building blocks for one stage: `learn_masks` (unlearn then recover) and `prune_model` (prune by a
threshold or a count, given masks).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from rnp_fast.api_checks import check_python_inputs
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, Goal, ModelConfig, RNPConfig
from rnp_fast.defense import DefendJob, Defense, compute_defense, write_results, write_summary
from rnp_fast.defense_stages import Inputs, load_defense_data, recover_stage, unlearn_stage
from rnp_fast.device import resolve_device
from rnp_fast.diagnostics import TargetReport, target_diagnostics
from rnp_fast.errors import UserError
from rnp_fast.evaluation.metrics import Metrics
from rnp_fast.inputs import caller_test_sets, image_set
from rnp_fast.loaders.sources import DataSource
from rnp_fast.models.swap import batchnorm_layers, check_maskable, swap_batchnorm
from rnp_fast.outputs import DEFENSE_RUN, RunDirectory
from rnp_fast.prune import Channel, lowest_step, prune_, rank_channels, single_threshold_step
from rnp_fast.report import check_every_channel_listed, check_mask_value
from rnp_fast.resolved import ModelFactory, ResolvedRun, resolve_run
from rnp_fast.rule_power import check_rule_images
from rnp_fast.runlog import RunLog

RESOLVED_BEFORE = [0]  # runs this process has resolved through the API


@dataclass
class ScoredStep:
    """One candidate of the pruning schedule and what scoring it gave."""

    label: float  # the threshold (or the channel count with pruning_by="number")
    pruned: list[tuple[str, int]]  # (BatchNorm layer name, channel index), lowest mask first
    metrics: Metrics  # NaN where the test set it needs was not given; metrics.estimate(name): n, interval
    holdout_acc: float  # clean accuracy on the held-out defense images (the threshold rule's data)
    holdout_acc_n: int = 0  # the held-out images
    holdout_acc_ci95: tuple[float, float] | None = None  # its 95 % Wilson interval


Step = ScoredStep  # its name in rnp_fast 0.1.0


@dataclass
class DefenseResult:
    model: nn.Module  # the purified model: a copy of the caller's, same class and state_dict keys
    masks: dict[str, torch.Tensor]  # BatchNorm layer name -> mask value per channel (float32, CPU)
    steps: list[ScoredStep]
    threshold: float | None  # the chosen threshold (summary["rule"] says how it was chosen)
    summary: dict  # what summary.json holds
    defense: Defense = field(repr=False)
    log_lines: list[str] = field(default_factory=list, repr=False)
    diagnostics: TargetReport | None = field(default=None, repr=False)  # the target-class diagnostics

    def save(self, out: str | Path) -> Path:
        """Write the run directory the CLI writes (mask values, pruning tables, plot, purified
        model, summary, config, log), atomically; never over a folder rnp-fast did not make."""
        with RunDirectory(out, kind=DEFENSE_RUN) as directory:
            directory.write_text("output.log", "".join(line + "\n" for line in self.log_lines))
            write_results(directory, self.defense, self.diagnostics)
            write_summary(directory, self.defense, self.summary)
        return directory.target


def defend(
    model: nn.Module,
    defense,
    *,
    mean,
    std,
    test=None,
    poisoned=None,
    rnp: RNPConfig | None = None,
    data: DataConfig | None = None,
    engine: EngineConfig | None = None,
    success: Goal | None = None,
) -> DefenseResult:
    """Reconstructive Neuron Pruning of ``model`` (left unchanged), as ``rnp-fast defend`` runs it.

    defense: clean defense data, ``(images, labels)`` or a Dataset (see `rnp_fast.inputs`);
    mean, std: the per-channel normalisation the model expects (images in [0, 1]);
    test: the clean test set (clean accuracy per step); poisoned: triggered test images with the
    attack's labels, optionally their true labels third (ASR, robust accuracy);
    rnp, engine: as the CLI's flags; data: batch sizes, augmentation, hold-out and seed (its
    ``ratio`` draws a subset of ``defense``; default here 1.0, all of it);
    success: what the verdict (``summary["verdict"]``) calls a success, as ``--success-asr`` and
    ``--success-clean-drop`` (default `Goal()`); it needs ``test`` and ``poisoned`` to judge by.
    """
    started = time.perf_counter()
    if success is not None and (test is None or poisoned is None):
        raise UserError("success needs test and poisoned: without both test sets there is no verdict to give")
    job, run = python_run(model, defense, mean, std, test, poisoned, rnp, data, engine)
    if success is not None:
        job = replace(job, goal=success)
    log = RunLog(None, job.engine.quiet, keep=True)
    inputs = Inputs(run.new_model())
    computed = compute_defense(job, run, inputs, log=log, started=started)
    diagnostics = target_diagnostics(computed, log)  # as run_defense: clean data only
    summary = computed.summary()
    return DefenseResult(
        model=purified_copy(model, computed.purified),
        masks=masks_of(computed.channels),
        steps=steps_of(computed),
        threshold=summary["threshold"],
        summary=summary,
        defense=computed,
        log_lines=log.lines,
        diagnostics=diagnostics,
    )


def learn_masks(
    model: nn.Module,
    defense,
    *,
    mean,
    std,
    rnp: RNPConfig | None = None,
    data: DataConfig | None = None,
    engine: EngineConfig | None = None,
) -> dict[str, torch.Tensor]:
    """RNP's first two stages alone: unlearn a copy of ``model`` on ``defense``, then recover the
    masks; returns {BatchNorm layer name: mask value per channel}. Arguments as for `defend`."""
    started = time.perf_counter()
    job, run = python_run(model, defense, mean, std, None, None, rnp, data, engine, chooses=False)
    log, inputs = RunLog(None, job.engine.quiet), Inputs(run.new_model())
    loaded = load_defense_data(job, run, None, log, started)
    unlearned = unlearn_stage(job, run, inputs, loaded, log)
    return masks_of(recover_stage(job, run, inputs, unlearned, loaded, log).channels)


def prune_model(
    model: nn.Module, masks: dict[str, torch.Tensor], *, threshold: float | None = None, count: int | None = None
) -> nn.Module:
    """A copy of ``model`` with the channels pruned (BatchNorm gamma set to 0, beta kept) whose
    mask is <= ``threshold``, or the ``count`` lowest; ``model`` is left unchanged."""
    if (threshold is None) == (count is None):
        raise UserError("prune_model takes a threshold or a count (one of them)")
    ranked = rank_channels(channels_of(model, masks))
    if threshold is not None:
        step = single_threshold_step(ranked, threshold)
    else:
        step = lowest_step(ranked, float(count), min(int(count), len(ranked)))
    return prune_(copy.deepcopy(model), step.channels)


# -- from the caller's objects to a resolved run ----------------------------------------------


def python_run(
    model, defense, mean, std, test, poisoned, rnp, data, engine, chooses: bool = True
) -> tuple[DefendJob, ResolvedRun]:
    """The job and resolved run of a defense of Python objects (checked before any work);
    ``chooses``: the threshold rule will choose (`learn_masks` stops before it)."""
    if not isinstance(model, nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_maskable(model)
    mean, std = channel_values(mean, "mean"), channel_values(std, "std")
    if len(mean) != len(std) or min(std) <= 0:
        raise UserError(f"mean and std need one value per channel and std > 0, got {mean} and {std}")
    name = f"{type(model).__module__}.{type(model).__qualname__}"
    job = DefendJob(
        model_path=None,
        out=None,
        model=ModelConfig(arch=name),
        data=data or DataConfig(ratio=1.0),
        rnp=rnp or RNPConfig(),
        engine=engine or EngineConfig(),
    )
    train = image_set(defense, len(mean), "defense")
    tests = caller_test_sets(test, poisoned, train, mean, std, resolve_device(job.engine.device))
    check_python_inputs(model, train, tests, mean, std)  # the model's device, forward and labels (api_checks)
    if chooses:
        check_rule_images(len(train), job.data, job.rnp)  # the threshold rule's images, as the CLI checks them
    # The source's test split is never read when the test sets are given; it holds the caller's clean set.
    source = DataSource("python", train, tests.clean, class_count(train, tests), mean, std)
    build = copies_of(model)
    # --compile auto: from the second defense in this process on, compiled steps are reused
    reuse = RESOLVED_BEFORE[0] > 0
    RESOLVED_BEFORE[0] += 1
    run = resolve_run(
        job.model, job.data, AttackConfig(), job.engine, source=source, build=build, tests=tests, reuse=reuse
    )
    return job, run


def channel_values(values, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in torch.as_tensor(values).reshape(-1).tolist())
    except (TypeError, ValueError):
        raise UserError(f"{name} must be one number per channel, got {values!r}") from None


def class_count(train, tests) -> int:
    labels = [train.labels, tests.clean.labels.cpu(), tests.poison_targets.cpu()]
    return max(2, 1 + max(int(part.max()) for part in labels if len(part)))


def copies_of(model: nn.Module) -> ModelFactory:
    """Fresh copies of the caller's model with BatchNorm layers of the class asked for, in float32:
    a half-precision (or bfloat16) model is defended in the engine's precision (float32 weights,
    autocast as --amp says), and its purified copy is handed back in the caller's dtypes."""

    def build(norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
        return swap_batchnorm(copy.deepcopy(model), norm_layer).float()

    return build


# -- from the defense back to the caller's terms -----------------------------------------------


def purified_copy(model: nn.Module, purified: nn.Module) -> nn.Module:
    """A copy of the caller's model (its class, device, dtypes, train/eval flag) holding the
    purified weights (load_state_dict copies them into the copy's own dtypes)."""
    result = copy.deepcopy(model)
    result.load_state_dict(purified.state_dict())
    return result


def masks_of(channels: list[Channel]) -> dict[str, torch.Tensor]:
    values: dict[str, list[float]] = {}
    for channel in channels:  # module order, channel order
        values.setdefault(channel.layer, []).append(channel.value)
    return {layer: torch.tensor(layer_values, dtype=torch.float32) for layer, layer_values in values.items()}


def channels_of(model: nn.Module, masks: dict[str, torch.Tensor]) -> list[Channel]:
    """Every channel with its mask value, in ``model``'s module order (which breaks ties in the
    ranking), held to a mask file's rules: every BatchNorm channel once, each value in [0, 1]."""
    sizes = {name: layer.num_features for name, layer in batchnorm_layers(model)}
    unknown = [name for name in masks if name not in sizes]
    if unknown:
        raise UserError(f"masks name layers that are not BatchNorm layers of the model: {', '.join(unknown[:4])}")
    channels, seen = [], set()
    for name in (name for name in sizes if name in masks):
        values = torch.as_tensor(masks[name]).detach().float().reshape(-1).tolist()
        if len(values) != sizes[name]:
            raise UserError(f"masks[{name!r}] has {len(values)} values; the layer has {sizes[name]} channels")
        for index, value in enumerate(values):
            check_mask_value(value, f"masks[{name!r}][{index}]")
            channels.append(Channel(name, index, value))
            seen.add((name, index))
    check_every_channel_listed(seen, sizes, "masks", holder="masks")
    return channels


def steps_of(computed: Defense) -> list[ScoredStep]:
    pruning = computed.pruning
    steps = []
    for number, (step, metrics) in enumerate(zip(pruning.steps, pruning.metrics, strict=True)):
        held = pruning.holdout.estimate(number)
        pruned = [(c.layer, c.index) for c in step.channels]
        steps.append(ScoredStep(step.label, pruned, metrics, pruning.holdout.per_step[number], held.n, held.ci95))
    return steps
