"""The whole defense: load, unlearn, recover, prune, choose, save.

Everything that can be checked (configuration, model file, masks, data) is checked before the run
directory is created; the run directory itself is written atomically (see `outputs`).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rnp_fast import __version__
from rnp_fast.attacks import build_trigger
from rnp_fast.checkpoint import load_model_weights, save_reference_checkpoint, save_safetensors
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig, to_dict
from rnp_fast.data import defense_data, training_loader
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.engine import EAGER, EngineSettings, resolve_engine
from rnp_fast.errors import UserError
from rnp_fast.evaluate import Metrics, build_test_sets, defense_effectiveness
from rnp_fast.loaders.sources import DataSource, load_source
from rnp_fast.masked_bn import MaskedBatchNorm2d
from rnp_fast.models import build_model
from rnp_fast.outputs import RunDirectory, vet_output
from rnp_fast.prune import Channel, PruneStep, batchnorm_sizes, prune_, rank_channels, schedule, single_threshold_step
from rnp_fast.pruning_eval import SweepOptions, holdout_accuracies, make_evaluator, score_steps
from rnp_fast.recover import recover
from rnp_fast.report import (
    EPOCH_HEADER,
    epoch_row,
    format_mask_values,
    format_pruning_csv,
    format_pruning_table,
    plot_pruning,
    read_mask_file,
)
from rnp_fast.runlog import RunLog
from rnp_fast.select import Choice, choose_step
from rnp_fast.unlearn import unlearn


@dataclass
class DefendJob:
    model_path: str
    out: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    rnp: RNPConfig = field(default_factory=RNPConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    mask_file: str | None = None
    unlearned_model: str | None = None


@dataclass
class Prepared:
    """What the checks before the run produce."""

    device: torch.device
    source: DataSource
    backdoored: nn.Module
    unlearned: nn.Module | None
    channels: list[Channel] | None
    engine: EngineSettings = EAGER


def prepare(job: DefendJob) -> Prepared:
    device = resolve_device(job.engine.device)
    engine = resolve_engine(job.engine, device)
    source = load_source(job.data.dataset, job.data.data_dir, job.data.download, job.data.image_size)
    if job.attack.target >= source.num_classes:
        raise UserError(f"--target {job.attack.target} is outside the {source.num_classes} classes of {source.name}")
    backdoored = new_model(job.model, source.num_classes)
    load_model_weights(backdoored, job.model_path, job.model.arch)
    unlearned = None
    if job.unlearned_model:
        unlearned = load_model_weights(new_model(job.model, source.num_classes), job.unlearned_model, job.model.arch)
    channels = read_mask_file(job.mask_file, batchnorm_sizes(backdoored)) if job.mask_file else None
    unlearned = unlearned.to(device) if unlearned else None
    return Prepared(device, source, backdoored.to(device), unlearned, channels, engine)


def new_model(config: ModelConfig, num_classes: int, norm_layer=nn.BatchNorm2d) -> nn.Module:
    return build_model(config.arch, num_classes, config.width, norm_layer)


def run_defense(job: DefendJob) -> dict:
    """Run RNP end to end; returns the summary (also written to ``summary.json``)."""
    started = time.perf_counter()
    reads = [job.model_path, job.mask_file, job.unlearned_model, job.data.data_dir, *job.attack.files()]
    vet_output(job.out, reads)  # before any work: never replace what rnp-fast did not make
    prepared = prepare(job)
    with RunDirectory(job.out, reads, kind="defense run") as run:
        log = RunLog(run.path("output.log"), job.engine.quiet)
        try:
            summary = defend_into(run, log, job, prepared, started)
        finally:
            log.close()
    return summary


def defend_into(run: RunDirectory, log: RunLog, job: DefendJob, prepared: Prepared, started: float) -> dict:
    device, source = prepared.device, prepared.source
    log.info(f"rnp_fast {__version__} on {describe_device(device)}, mode {job.engine.mode}")
    log.info(f"engine: {prepared.engine.describe()}")
    log.info("----------- Data Initialization --------------")
    image_shape = {"image_size": source.image_shape[-1], "channels": source.image_shape[0]}
    trigger = build_trigger(job.attack.attack, **image_shape, **job.attack.trigger_params())
    tests = build_test_sets(
        source.test,
        trigger,
        job.attack.label_mode,
        job.attack.target,
        source.num_classes,
        source.mean,
        source.std,
        device,
    )
    defense = defense_data(source, job.data)
    sweep = sweep_options(job, prepared.engine, log)  # the evaluation settings of every phase
    evaluator = make_evaluator(sweep.mode, tests, sweep.batch_size, sweep.channels_last)
    timings: dict[str, float] = {"data": time.perf_counter() - started}
    log.info("----------- Backdoor Model Initialization --------------")
    tick = time.perf_counter()
    before = evaluator(prepared.backdoored)
    timings["model_eval"] = time.perf_counter() - tick
    log.info(
        f"before defense: clean {before.clean_acc:.4f}, ASR {before.asr:.4f} ({len(defense.train)} defense "
        f"images, {len(defense.holdout)} held out)"
    )
    stop = {"stop_epoch": None, "reached_threshold": None, "diverged_epoch": None}
    channels = prepared.channels
    if channels is None:
        channels = learn_masks(job, prepared, defense.train, evaluator, log, timings, stop)
    run.write_text("mask_values.txt", format_mask_values(channels))

    tick = time.perf_counter()
    log.info("----------- Backdoored Model Pruning --------------")
    ranked = rank_channels(channels)
    steps = schedule(ranked, job.rnp.pruning_by, job.rnp.pruning_max, job.rnp.pruning_step)
    metrics = score_steps(prepared.backdoored, steps, tests, sweep)
    base_holdout, holdout = holdout_accuracies(
        prepared.backdoored, steps, defense.rule_images, source.mean, source.std, sweep
    )
    for step, metric in zip(steps, metrics, strict=True):
        log.info(f"{step.label:.4g} \t pruned {step.count} \t ASR {metric.asr:.4f} \t clean {metric.clean_acc:.4f}")
    timings["prune_eval"] = time.perf_counter() - tick
    choice, chosen = pick(job, steps, ranked, base_holdout, holdout, defense.rule_data)
    if job.rnp.threshold is None and not len(defense.holdout):
        log.info(
            "WARNING: no defense images are held out (--holdout), so the threshold is chosen on the training images"
        )
    log.info(f"threshold rule: {choice.rule}")
    purified = prune_(copy.deepcopy(prepared.backdoored), chosen.channels if chosen else [])
    tick = time.perf_counter()
    after = evaluator(purified)
    timings["model_eval"] += time.perf_counter() - tick
    log.info(f"after defense: clean {after.clean_acc:.4f}, ASR {after.asr:.4f}, {chosen.count if chosen else 0} pruned")

    table_name = f"pruning_by_{job.rnp.pruning_by}.txt"
    run.write_text(table_name, format_pruning_table(steps, metrics, job.rnp.pruning_by))
    run.write_text("pruning.csv", format_pruning_csv(steps, metrics, holdout))
    plot_pruning(run.path("pruning.png"), steps, metrics, job.rnp.pruning_by, choice.index)
    save_purified(run, purified, chosen, job)
    timings["total"] = time.perf_counter() - started
    rule_data = None if job.rnp.threshold is not None else defense.rule_data
    summary = make_summary(job, before, after, chosen, choice, stop, timings, device, rule_data)
    run.write_json("summary.json", summary)
    run.write_json("config.json", resolved_config(job, device))
    return summary


def sweep_options(job: DefendJob, engine: EngineSettings, log: RunLog) -> SweepOptions:
    return SweepOptions(
        mode=job.engine.mode,
        sweep_mode=job.engine.sweep_mode,
        batch_size=eval_batch(job, engine),
        chunk_size=job.engine.sweep_chunk,
        amp=engine.amp,
        channels_last=engine.eval_channels_last,
        warn=log.info,
    )


def eval_batch(job: DefendJob, engine: EngineSettings) -> int:
    return min(engine.eval_rows or job.data.eval_batch_size, job.data.eval_batch_size)


def learn_masks(job, prepared, train_data, evaluator, log, timings, stop) -> list[Channel]:
    """Unlearning (unless an unlearned model was given) then recovering; returns mask values."""
    eval_every = job.engine.eval_every if job.engine.eval_every or job.engine.mode == "fast" else 1
    loader = training_loader(train_data, prepared.source, job.data, job.engine, prepared.device)
    reporter = EpochReporter(log, evaluator, eval_every)
    unlearned = prepared.unlearned
    if unlearned is None:
        tick = time.perf_counter()
        log.info(EPOCH_HEADER)
        log.info("----------- Model Unlearning --------------")
        bar = log.bar(job.rnp.unlearning_epochs + 1, "unlearning")
        result = unlearn(prepared.backdoored, loader, job.rnp, reporter.callback(bar), prepared.engine)
        bar.close()
        unlearned = result.model
        stop.update(stop_epoch=result.stop_epoch, reached_threshold=result.reached_threshold)
        stop["diverged_epoch"] = result.diverged_epoch
        if result.diverged_epoch is not None:
            log.info(
                f"WARNING: unlearning diverged in epoch {result.diverged_epoch} (non-finite loss or weights); "
                f"continuing with the state after epoch {result.stop_epoch}. Lower --unlearning-lr."
            )
        elif not result.reached_threshold:
            log.info(
                f"WARNING: training accuracy never reached --clean-threshold {job.rnp.clean_threshold} in "
                f"{job.rnp.unlearning_epochs + 1} epochs; continuing with the last unlearned state"
            )
        timings["unlearn"] = time.perf_counter() - tick - reporter.take_seconds()
    tick = time.perf_counter()
    log.info("----------- Model Recovering --------------")
    log.info(EPOCH_HEADER)
    masked = new_model(job.model, prepared.source.num_classes, MaskedBatchNorm2d).to(prepared.device)
    bar = log.bar(job.rnp.recovering_epochs, "recovering")
    result = recover(masked, unlearned, loader, job.rnp, reporter.callback(bar), prepared.engine)
    bar.close()
    timings["recover"] = time.perf_counter() - tick - reporter.take_seconds()
    timings["epoch_eval"] = reporter.total_seconds
    timings["batches"] = reporter.data_seconds  # part of unlearn and recover
    bad = [c for c in result.channels if not torch.isfinite(torch.tensor(c.value))]
    if bad:
        raise UserError(
            f"recovering produced non-finite masks (e.g. {bad[0].layer}[{bad[0].index}]); lower --recovering-lr"
        )
    return result.channels


class EpochReporter:
    """Logs the reference's per-epoch row, evaluating both test sets every ``eval_every`` epochs."""

    def __init__(self, log: RunLog, evaluator, eval_every: int):
        self.log, self.evaluator, self.eval_every = log, evaluator, eval_every
        self.pending_seconds = self.total_seconds = 0.0  # evaluation time, kept apart from training's
        self.data_seconds = 0.0  # time the training loops waited for batches

    def take_seconds(self) -> float:
        seconds, self.pending_seconds = self.pending_seconds, 0.0
        return seconds

    def evaluate(self, model):
        tick = time.perf_counter()
        metrics = self.evaluator(model)
        seconds = time.perf_counter() - tick
        self.pending_seconds += seconds
        self.total_seconds += seconds
        return metrics

    def callback(self, bar):
        def on_epoch(model, stats):
            due = self.eval_every and stats.epoch % self.eval_every == 0
            metrics = self.evaluate(model) if due else None
            self.data_seconds += stats.data_seconds
            self.log.info(epoch_row(stats.epoch, stats.lr, stats.seconds, stats.loss, stats.acc, metrics))
            bar.update(1)

        return on_epoch


def pick(job: DefendJob, steps, ranked, base_holdout, holdout, data: str) -> tuple[Choice, PruneStep | None]:
    if job.rnp.threshold is not None:
        step = single_threshold_step(ranked, job.rnp.threshold)
        return Choice(None, f"fixed --threshold {job.rnp.threshold}"), step
    choice = choose_step(holdout, base_holdout, job.rnp.tolerance, [s.label for s in steps], data)
    return choice, steps[choice.index] if choice.index is not None else None


def save_purified(run: RunDirectory, model: nn.Module, chosen: PruneStep | None, job: DefendJob) -> None:
    state = model.state_dict()
    info = {
        "arch": job.model.arch,
        "width": str(job.model.width),
        "pruned": str(chosen.count if chosen else 0),
        "threshold": str(chosen.label if chosen else None),
    }
    save_safetensors(state, run.path("purified.safetensors"), metadata=info)
    save_reference_checkpoint(state, run.path("purified.pth"), **info)


def make_summary(job, before: Metrics, after: Metrics, chosen, choice, stop, timings, device, rule_data) -> dict:
    return {
        "clean_acc_before": before.clean_acc,
        "asr_before": before.asr,
        "clean_acc_after": after.clean_acc,
        "asr_after": after.asr,
        "clean_acc_full_before": before.clean_acc_full,
        "clean_acc_full_after": after.clean_acc_full,
        "robust_acc_before": before.robust_acc,
        "robust_acc_after": after.robust_acc,
        "der": defense_effectiveness(before, after),
        "threshold": chosen.label if chosen and job.rnp.pruning_by == "threshold" else job.rnp.threshold,
        "pruned": chosen.count if chosen else 0,
        "pruning_by": job.rnp.pruning_by,
        "rule": choice.rule,
        "rule_data": rule_data,  # held-out images, or training images when none are held out
        "unlearning_stop_epoch": stop["stop_epoch"],
        "unlearning_reached_threshold": stop["reached_threshold"],
        "unlearning_diverged_epoch": stop["diverged_epoch"],
        "seconds": timings["total"],
        "timings": timings,
        "mode": job.engine.mode,
        "device": describe_device(device),
    }


def resolved_config(job: DefendJob, device: torch.device) -> dict:
    import platform

    import numpy

    return {
        "model_path": str(Path(job.model_path).resolve()),
        "mask_file": job.mask_file,
        "unlearned_model": job.unlearned_model,
        **to_dict(job.model, job.data, job.attack, job.rnp, job.engine),
        "versions": {
            "rnp_fast": __version__,
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "python": platform.python_version(),
        },
        "device": describe_device(device),
    }
