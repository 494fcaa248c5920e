"""The whole defense: load, unlearn, recover, prune, choose, save.

Everything that can be checked (output path, configuration, model file, masks, data) is checked
before the run directory is created; the run directory itself is written atomically (`outputs`).
The computation (`compute_defense`) is apart from the writing (`write_results`, `write_summary`):
the CLI writes at once, the Python API (`api`) when its caller saves the result.

In the fast mode the model before the defense and the purified model are two of the pruning
candidates (the unpruned one and the chosen one): their metrics come from the same scoring pass,
in the same precision, as every row of the pruning table. The reference mode evaluates them
separately, as the reference does.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from rnp_fast import __version__
from rnp_fast.checkpoint import save_reference_checkpoint, save_safetensors
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig, to_dict
from rnp_fast.data import DefenseData, defense_data
from rnp_fast.device import describe_device
from rnp_fast.errors import UserError
from rnp_fast.evaluation.metrics import Metrics, defense_effectiveness
from rnp_fast.evaluation.scoring import holdout_accuracies, samples_independent, score_steps
from rnp_fast.loaders.sources import DataSource
from rnp_fast.masked_bn import MaskedBatchNorm2d
from rnp_fast.outputs import RunDirectory, vet_output
from rnp_fast.provenance import versions
from rnp_fast.prune import (
    Channel,
    PruneStep,
    batchnorm_sizes,
    prune_,
    rank_channels,
    schedule,
    single_threshold_step,
)
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
from rnp_fast.resolved import ResolvedRun, resolve_run
from rnp_fast.runlog import RunLog
from rnp_fast.select import Choice, choose_step
from rnp_fast.unlearn import unlearn

UNPRUNED = PruneStep(label=float("nan"), count=0, channels=[])


@dataclass
class DefendJob:
    model_path: str | None  # None: the model is a Python object (rnp_fast.defend)
    out: str | None  # None: nothing is written until the caller saves the result (rnp_fast.defend)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    rnp: RNPConfig = field(default_factory=RNPConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    mask_file: str | None = None
    unlearned_model: str | None = None

    def reads(self) -> list[str | None]:
        """Every file or folder the defense reads: an output directory must not hold any of them."""
        return [self.model_path, self.mask_file, self.unlearned_model, self.data.data_dir, *self.attack.files()]


@dataclass
class Inputs:
    """The models and masks a defense starts from (checked before the run directory exists)."""

    backdoored: nn.Module
    unlearned: nn.Module | None = None
    channels: list[Channel] | None = None


@dataclass
class Pruning:
    """What scoring the schedule gives: per-step metrics, the choice, and before/after."""

    steps: list[PruneStep]
    metrics: list[Metrics]
    holdout: list[float]
    choice: Choice
    chosen: PruneStep | None
    before: Metrics
    after: Metrics


def load_inputs(job: DefendJob, run: ResolvedRun) -> Inputs:
    backdoored = run.load_model(job.model_path)
    unlearned = run.load_model(job.unlearned_model) if job.unlearned_model else None
    channels = read_mask_file(job.mask_file, batchnorm_sizes(backdoored)) if job.mask_file else None
    return Inputs(backdoored, unlearned, channels)


@dataclass
class Defense:
    """What a defense computed, before any file is written (the CLI writes it at once, the Python
    API when its caller saves the result)."""

    job: DefendJob
    run: ResolvedRun
    data: DefenseData
    channels: list[Channel]
    pruning: Pruning
    purified: nn.Module
    stop: dict
    timings: dict[str, float]


def run_defense(job: DefendJob, reuse: bool = False, source: DataSource | None = None) -> dict:
    """Run RNP end to end; returns the summary (also written to ``summary.json``). ``reuse``: this
    process will defend again (a sweep, a benchmark), where compiling the steps pays back.
    ``source``: the data instead of ``job.data.dataset`` (a benchmark's reduced test split)."""
    started = time.perf_counter()
    vet_output(job.out, job.reads())  # before any work: never replace what rnp-fast did not make
    run = resolve_run(job.model, job.data, job.attack, job.engine, reuse=reuse, source=source)
    inputs = load_inputs(job, run)
    with RunDirectory(job.out, job.reads(), kind="defense run") as out:
        log = RunLog(out.path("output.log"), job.engine.quiet)
        run.warn = log.info
        try:
            defense = compute_defense(job, run, inputs, log, started)
            write_results(out, defense)
            summary = finish(defense, started)
            write_summary(out, defense, summary)
            return summary
        finally:
            log.close()


def compute_defense(job: DefendJob, run: ResolvedRun, inputs: Inputs, log: RunLog, started: float) -> Defense:
    """Unlearn, recover (unless masks were given), prune, score and choose: everything but the files."""
    log_setup(log, job, run)
    log.info("----------- Data Initialization --------------")
    run.tests  # noqa: B018 - poison and place the test sets now: their time is part of "data"
    defense = defense_data(run.source, job.data)
    timings: dict[str, float] = {"data": time.perf_counter() - started}
    log.info("----------- Backdoor Model Initialization --------------")
    log.info(f"{len(defense.train)} defense images, {len(defense.holdout)} held out")
    check_batched_scoring(run, inputs.backdoored, defense, log)
    separate_before = reference_before(job, run, inputs.backdoored, log, timings)
    stop = {"stop_epoch": None, "reached_threshold": None, "diverged_epoch": None}
    channels = inputs.channels
    if channels is None:
        channels = learn_masks(job, run, inputs, defense, log, timings, stop)
    pruning = prune_and_choose(job, run, inputs.backdoored, channels, defense, separate_before, log, timings)
    purified = prune_(copy.deepcopy(inputs.backdoored), pruning.chosen.channels if pruning.chosen else [])
    return Defense(job, run, defense, channels, pruning, purified, stop, timings)


def log_setup(log: RunLog, job: DefendJob, run: ResolvedRun) -> None:
    log.info(f"rnp_fast {__version__} on {describe_device(run.device)}, mode {job.engine.mode}")
    log.info(f"engine: {run.engine.describe()}")
    for reason in run.engine.reasons:
        log.info(reason)


def check_batched_scoring(run: ResolvedRun, model: nn.Module, defense: DefenseData, log: RunLog) -> None:
    """Batched scoring folds the candidates into the batch, so it needs a model whose eval-mode
    forward treats samples independently: the zoo's staged models do by construction; any other
    model is checked once on a few defense images, and scored sequentially if it fails."""
    if not run.scoring().batched or callable(getattr(model, "stages", None)):
        return
    images = defense.train.images[:4].to(run.device)
    if samples_independent(model, images, run.mean, run.std):
        return
    message = (
        f"{type(model).__name__}'s eval-mode outputs depend on the other samples of a batch, so pruning "
        "candidates are scored sequentially (slower) instead of batched"
    )
    log.info(f"WARNING: {message}")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    run.engine_config = replace(run.engine_config, scoring="sequential")


def write_results(out: RunDirectory, defense: Defense) -> None:
    """Masks, pruning tables, plot and purified model (the summary comes after, with the total time)."""
    out.write_text("mask_values.txt", format_mask_values(defense.channels))
    write_outputs(out, defense.job, defense.pruning, defense.purified)


def finish(defense: Defense, started: float) -> dict:
    """The summary, with the time from ``started`` until now as the total."""
    defense.timings["total"] = time.perf_counter() - started
    return make_summary(defense.job, defense.pruning, defense.stop, defense.timings, defense.run, defense.data)


def write_summary(out: RunDirectory, defense: Defense, summary: dict) -> None:
    out.write_json("summary.json", summary)
    out.write_json("config.json", resolved_config(defense.job, defense.run.device))


def reference_before(job, run: ResolvedRun, backdoored, log, timings) -> Metrics | None:
    """The reference mode scores the backdoored model first, on its own, as the reference does."""
    if job.engine.mode != "reference":
        return None
    tick = time.perf_counter()
    before = run.evaluator()(backdoored)
    timings["model_eval"] = time.perf_counter() - tick
    log.info(f"before defense: clean {before.clean_acc:.4f}, ASR {before.asr:.4f}")
    return before


def prune_and_choose(job, run: ResolvedRun, backdoored, channels, defense: DefenseData, before, log, timings):
    tick = time.perf_counter()
    log.info("----------- Backdoored Model Pruning --------------")
    ranked = rank_channels(channels)
    steps = schedule(ranked, job.rnp.pruning_by, job.rnp.pruning_max, job.rnp.pruning_step)
    scoring = run.scoring()
    base_holdout, holdout = holdout_accuracies(
        backdoored, steps, defense.rule_images, run.source.mean, run.source.std, scoring
    )
    choice, chosen = pick(job, steps, ranked, base_holdout, holdout, defense.rule_data)
    if before is None:  # fast mode: before and after are candidates of the same pass
        extra = [chosen] if chosen is not None else []
        scored = score_steps(backdoored, [UNPRUNED, *steps, *extra], run.tests, scoring)
        before, metrics = scored[0], scored[1 : 1 + len(steps)]
        after = scored[-1] if chosen is not None else before
    else:
        metrics = score_steps(backdoored, steps, run.tests, scoring)
        after = separate_after(run, backdoored, chosen, timings)
    for step, metric in zip(steps, metrics, strict=True):
        log.info(f"{step.label:.4g} \t pruned {step.count} \t ASR {metric.asr:.4f} \t clean {metric.clean_acc:.4f}")
    timings["prune_eval"] = time.perf_counter() - tick - timings.get("after_eval", 0.0)
    if job.rnp.threshold is None and not len(defense.holdout):
        log.info(
            "WARNING: no defense images are held out (--holdout), so the threshold is chosen on the training images"
        )
    log.info(f"threshold rule: {choice.rule}")
    log.info(f"before defense: clean {before.clean_acc:.4f}, ASR {before.asr:.4f}")
    log.info(f"after defense: clean {after.clean_acc:.4f}, ASR {after.asr:.4f}, {chosen.count if chosen else 0} pruned")
    return Pruning(steps, metrics, holdout, choice, chosen, before, after)


def separate_after(run: ResolvedRun, backdoored, chosen: PruneStep | None, timings) -> Metrics:
    tick = time.perf_counter()
    after = run.evaluator()(prune_(copy.deepcopy(backdoored), chosen.channels if chosen else []))
    timings["after_eval"] = time.perf_counter() - tick
    timings["model_eval"] = timings.get("model_eval", 0.0) + timings["after_eval"]
    return after


def learn_masks(job, run: ResolvedRun, inputs: Inputs, defense: DefenseData, log, timings, stop) -> list[Channel]:
    """Unlearning (unless an unlearned model was given) then recovering; returns mask values."""
    eval_every = job.engine.eval_every if job.engine.eval_every or job.engine.mode == "fast" else 1
    loader = run.defense_loader(defense.train)
    reporter = EpochReporter(log, run.epoch_evaluator(), eval_every)
    unlearned = inputs.unlearned
    if unlearned is None:
        unlearned = unlearning(job, run, inputs.backdoored, loader, reporter, log, timings, stop)
    tick = time.perf_counter()
    log.info("----------- Model Recovering --------------")
    log.info(EPOCH_HEADER)
    masked = run.new_model(MaskedBatchNorm2d)
    sample = next(iter(loader))[0] if run.engine.bn_kernel == "auto" else None
    bar = log.bar(job.rnp.recovering_epochs, "recovering")
    result = recover(masked, unlearned, loader, job.rnp, reporter.callback(bar), run.engine, sample)
    bar.close()
    timings["recover"] = time.perf_counter() - tick - reporter.take_seconds()
    timings["recover_first_step"] = result.step_timings.first_call_seconds
    timings["epoch_eval"] = reporter.total_seconds
    timings["batches"] = reporter.data_seconds  # part of unlearn and recover
    bad = [c for c in result.channels if not math.isfinite(c.value)]  # one float each: no tensor per channel
    if bad:
        raise UserError(
            f"recovering produced non-finite masks (e.g. {bad[0].layer}[{bad[0].index}]); lower --recovering-lr"
        )
    return result.channels


def unlearning(job, run: ResolvedRun, backdoored, loader, reporter, log, timings, stop) -> nn.Module:
    tick = time.perf_counter()
    log.info(EPOCH_HEADER)
    log.info("----------- Model Unlearning --------------")
    bar = log.bar(job.rnp.unlearning_epochs + 1, "unlearning")
    result = unlearn(backdoored, loader, job.rnp, reporter.callback(bar), run.engine)
    bar.close()
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
    timings["unlearn_first_step"] = result.step_timings.first_call_seconds
    stop["compile_warm"] = result.step_timings.warm
    return result.model


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


def write_outputs(out: RunDirectory, job: DefendJob, pruning: Pruning, purified: nn.Module) -> None:
    by = job.rnp.pruning_by
    out.write_text(f"pruning_by_{by}.txt", format_pruning_table(pruning.steps, pruning.metrics, by))
    out.write_text("pruning.csv", format_pruning_csv(pruning.steps, pruning.metrics, pruning.holdout))
    plot_pruning(out.path("pruning.png"), pruning.steps, pruning.metrics, by, pruning.choice.index)
    save_purified(out, purified, pruning.chosen, job)


def save_purified(out: RunDirectory, model: nn.Module, chosen: PruneStep | None, job: DefendJob) -> None:
    state = model.state_dict()
    info = {
        "arch": job.model.arch,
        "width": str(job.model.width),
        "pruned": str(chosen.count if chosen else 0),
        "threshold": str(chosen.label if chosen else None),
    }
    save_safetensors(state, out.path("purified.safetensors"), metadata=info)
    save_reference_checkpoint(state, out.path("purified.pth"), **info)


def make_summary(job: DefendJob, pruning: Pruning, stop, timings, run: ResolvedRun, defense: DefenseData) -> dict:
    before, after, chosen = pruning.before, pruning.after, pruning.chosen
    by_threshold = job.rnp.pruning_by == "threshold"
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
        "threshold": chosen.label if chosen and by_threshold else job.rnp.threshold,
        "pruned": chosen.count if chosen else 0,
        "pruning_by": job.rnp.pruning_by,
        "rule": pruning.choice.rule,
        "rule_data": None if job.rnp.threshold is not None else defense.rule_data,
        "unlearning_stop_epoch": stop["stop_epoch"],
        "unlearning_reached_threshold": stop["reached_threshold"],
        "unlearning_diverged_epoch": stop["diverged_epoch"],
        "seconds": timings["total"],
        "timings": timings,
        "engine": engine_summary(run, stop),
        "mode": job.engine.mode,
        "device": describe_device(run.device),
    }


def engine_summary(run: ResolvedRun, stop: dict) -> dict:
    """What ran accelerated, and whether compiled code came warm from this process's cache."""
    engine = run.engine
    return {
        "compile": engine.compile,
        "cuda_graphs": engine.cuda_graphs,
        "amp": str(engine.amp).removeprefix("torch.") if engine.amp else None,
        "compile_cache": ("warm, in-process" if stop.get("compile_warm") else "cold") if engine.compile else None,
        "reasons": list(engine.reasons),
    }


def resolved_config(job: DefendJob, device: torch.device) -> dict:
    from_python = job.model_path is None  # rnp_fast.defend: the caller gave the test sets, no attack made them
    sections = (
        [job.model, job.data, job.rnp, job.engine]
        if from_python
        else [job.model, job.data, job.attack, job.rnp, job.engine]
    )
    return {
        "model_path": None if from_python else str(Path(job.model_path).resolve()),
        "mask_file": job.mask_file,
        "unlearned_model": job.unlearned_model,
        **to_dict(*sections),
        "versions": versions(),
        "device": describe_device(device),
    }
