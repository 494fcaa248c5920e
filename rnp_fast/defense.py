"""The whole defense: resolve, load, unlearn, recover, score, choose, purify, write.

`run_defense` (the CLI's) and `compute_defense` (the part that computes, shared with the Python API
and with repeated defenses in one process) read top to bottom, one stage a line; the stages are in
`defense_stages`, each returning a small frozen result with its own timing.

Everything that can be checked (output path, configuration, model file, masks, data) is checked
before the run directory is created; the run directory itself is written atomically (`outputs`).
The CLI writes at once, the Python API (`api`) when its caller saves the result.

In the fast mode the model before the defense and the purified model are two of the pruning
candidates (the unpruned one and the chosen one): their metrics come from the same scoring pass,
in the same precision, as every row of the pruning table. The reference mode evaluates them
separately, as the reference does.
"""

from __future__ import annotations

import math
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rnp_fast import __version__
from rnp_fast.checkpoint import save_reference_checkpoint, save_safetensors
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, Goal, ModelConfig, RNPConfig, to_dict
from rnp_fast.defense_stages import (
    Before,
    Inputs,
    LoadedData,
    Pruning,
    Recovered,
    Timings,
    Unlearned,
    choose,
    load_defense_data,
    purify,
    recover_stage,
    reference_before,
    score_candidates,
    score_tests,
    unlearn_stage,
)
from rnp_fast.device import describe_device
from rnp_fast.diagnostics import TargetReport, target_diagnostics, write_diagnostics
from rnp_fast.evaluation.intervals import Estimate
from rnp_fast.evaluation.metrics import Metrics, defense_effectiveness, drop
from rnp_fast.loaders.sources import DataSource
from rnp_fast.outputs import DEFENSE_RUN, RunDirectory, vet_output
from rnp_fast.provenance import provenance
from rnp_fast.prune import Channel, PruneStep, batchnorm_sizes
from rnp_fast.report import format_mask_values, format_pruning_csv, format_pruning_table, plot_pruning, read_mask_file
from rnp_fast.resolved import ResolvedRun, resolve_run
from rnp_fast.rule_power import check_rule_images
from rnp_fast.runlog import RunLog
from rnp_fast.verdict import Verdict, judge, unjudged


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
    goal: Goal = field(default_factory=Goal)  # what the verdict calls a success (--success-asr, ...)

    def reads(self) -> list[str | None]:
        """Every file or folder the defense reads: an output directory must not hold any of them."""
        return [self.model_path, self.mask_file, self.unlearned_model, self.data.data_dir, *self.attack.files()]


def run_defense(job: DefendJob, reuse: bool = False, source: DataSource | None = None) -> dict:
    """RNP end to end; returns the summary (also written to ``summary.json``). ``reuse``: this
    process will defend again (a sweep, a benchmark), where compiling the steps pays back.
    ``source``: the data instead of ``job.data.dataset`` (the harness's reduced test split)."""
    started = time.perf_counter()
    vet_output(job.out, job.reads(), kind=DEFENSE_RUN)  # before any work: never replace what rnp-fast did not make
    run = resolve_run(job.model, job.data, job.attack, job.engine, reuse=reuse, source=source)
    inputs = load_inputs(job, run)
    with RunDirectory(job.out, job.reads(), kind=DEFENSE_RUN) as out, run_log(out, job) as log:
        defense = compute_defense(job, run, inputs, log=log, started=started)
        diagnostics = target_diagnostics(defense, log)  # beyond the paper: clean data only
        return write_defense(out, defense, started, diagnostics)


def run_log(out: RunDirectory, job: DefendJob) -> closing[RunLog]:
    """output.log in the run directory (and the terminal unless quiet), closed with the run."""
    return closing(RunLog(out.path("output.log"), job.engine.quiet))


def compute_defense(
    job: DefendJob,
    run: ResolvedRun,
    inputs: Inputs,
    seed: int | None = None,
    log: RunLog | None = None,
    started: float | None = None,
    order_seed: int | None = None,
) -> Defense:
    """Everything but the files, one stage a line. ``seed``: the defense data's (subset, order,
    augmentation; default the job's), so one process can repeat the defense on other data with
    the run resolved, the inputs loaded and the steps compiled once; ``inputs`` are left unchanged.
    ``order_seed``: the loader's order and augmentation alone, the defense images kept (default:
    ``seed``'s), to tell the two sources of noise apart.
    ``log``: default a quiet one in memory; ``started``: what the timings count from (default now)."""
    log = log or RunLog(None, quiet=True)
    started = time.perf_counter() if started is None else started
    check_rule_images(len(run.source.train), job.data, job.rnp)  # the data read; the CLI checked known sizes earlier
    log_setup(log, job, run)
    loaded = load_defense_data(job, run, seed, log, started, order_seed)
    before = reference_before(job, run, inputs.backdoored, log)
    unlearned = unlearn_stage(job, run, inputs, loaded, log)
    recovered = recover_stage(job, run, inputs, unlearned, loaded, log)
    candidates = score_candidates(job, run, inputs.backdoored, recovered.channels, loaded.data, log)
    chosen = choose(job, candidates)
    pruning = score_tests(job, run, inputs.backdoored, candidates, chosen, before, log)
    purified = purify(inputs.backdoored, chosen.step)
    seconds = time.perf_counter() - started
    return Defense(job, run, loaded, before, unlearned, recovered, pruning, purified, seconds)


def load_inputs(job: DefendJob, run: ResolvedRun) -> Inputs:
    backdoored = run.load_model(job.model_path)
    unlearned = run.load_model(job.unlearned_model) if job.unlearned_model else None
    channels = read_mask_file(job.mask_file, batchnorm_sizes(backdoored)) if job.mask_file else None
    return Inputs(backdoored, unlearned, channels)


def log_setup(log: RunLog, job: DefendJob, run: ResolvedRun) -> None:
    log.info(f"rnp_fast {__version__} on {describe_device(run.device)}, mode {job.engine.mode}")
    log.info(f"engine: {run.engine.describe()}")
    for reason in (*run.engine.reasons, *run.notes):
        log.info(reason)


@dataclass(frozen=True)
class Defense:
    """What a defense computed, before any file is written (the CLI writes it at once, the Python
    API when its caller saves the result), stage by stage."""

    job: DefendJob
    run: ResolvedRun
    loaded: LoadedData
    before: Before
    unlearned: Unlearned
    recovered: Recovered
    pruning: Pruning
    purified: nn.Module
    seconds: float  # from the start until the defense was computed

    @property
    def channels(self) -> list[Channel]:
        return self.recovered.channels

    @property
    def verdict(self) -> Verdict | None:
        """Success or not at ``job.goal`` (None: a test set it needs was not given)."""
        return judge(self.pruning.before, self.pruning.after, self.job.goal)

    @property
    def timings(self) -> Timings:
        return Timings.of(self.loaded, self.before, self.unlearned, self.recovered, self.pruning)

    def summary(self, total: float | None = None) -> dict:
        """What summary.json holds; ``total``: the run's seconds (default: until computed)."""
        return make_summary(self, self.seconds if total is None else total)


def write_defense(out: RunDirectory, defense: Defense, started: float, diagnostics: TargetReport | None = None) -> dict:
    """Every file of the run directory; the summary's total counts until the results are written."""
    write_results(out, defense, diagnostics)
    summary = defense.summary(time.perf_counter() - started)
    write_summary(out, defense, summary)
    return summary


def write_results(out: RunDirectory, defense: Defense, diagnostics: TargetReport | None = None) -> None:
    """Masks, pruning tables, plot and purified model (the summary comes after, with the total time);
    ``diagnostics``: also the per-class columns, diagnostics.json and per_class.png."""
    out.write_text("mask_values.txt", format_mask_values(defense.channels))
    write_outputs(out, defense.job, defense.pruning, defense.purified, diagnostics)


def write_summary(out: RunDirectory, defense: Defense, summary: dict) -> None:
    out.write_json("summary.json", summary)
    out.write_json("config.json", resolved_config(defense.job, defense.run.device))


def write_outputs(
    out: RunDirectory, job: DefendJob, pruning: Pruning, purified: nn.Module, diagnostics: TargetReport | None = None
) -> None:
    by = job.rnp.pruning_by
    out.write_text(f"pruning_by_{by}.txt", format_pruning_table(pruning.steps, pruning.metrics, by))
    per_class = diagnostics.per_step if diagnostics else None
    out.write_text("pruning.csv", format_pruning_csv(pruning.steps, pruning.metrics, pruning.holdout, per_class))
    if diagnostics is not None:
        write_diagnostics(out, diagnostics, pruning.steps, pruning.choice.index, by)
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


def make_summary(defense: Defense, total: float) -> dict:
    job, pruning, unlearned = defense.job, defense.pruning, defense.unlearned
    before, after, chosen = pruning.before, pruning.after, pruning.chosen
    by_threshold = job.rnp.pruning_by == "threshold"
    verdict = defense.verdict
    return {
        **figures(before, after),
        **der_fields(before, after),
        "threshold": chosen.label if chosen and by_threshold else job.rnp.threshold,
        "pruned": chosen.count if chosen else 0,
        "pruning_by": job.rnp.pruning_by,
        "rule": pruning.choice.rule,
        "rule_data": None if job.rnp.threshold is not None else defense.loaded.data.rule_data,
        **pruning.holdout.estimate().fields("holdout_acc_before"),
        **holdout_after(pruning).fields("holdout_acc_after"),
        "rule_warning": pruning.choice.warning,
        "verdict": verdict.as_dict() if verdict else None,
        **({} if verdict else {"verdict_reason": unjudged(before, after)}),
        "unlearning_stop_epoch": unlearned.stop_epoch,
        "unlearning_reached_threshold": unlearned.reached_threshold,
        "unlearning_diverged_epoch": unlearned.diverged_epoch,
        "seconds": total,
        "timings": {**defense.timings.as_dict(), "total": total},
        "engine": engine_summary(defense.run, unlearned.compile_warm),
        "mode": job.engine.mode,
        "device": describe_device(defense.run.device),
    }


SUMMARY_FIGURES = ("clean_acc", "asr", "clean_acc_full", "robust_acc")  # summary.json's order: before, after


def figures(before: Metrics, after: Metrics) -> dict:
    """Every figure before and after with its n and 95 % interval beside it (``clean_acc_before``
    keeps its name and value, ``clean_acc_before_n`` and ``clean_acc_before_ci95`` join it), then
    the two clean drops (before - after) with their paired intervals."""
    fields = {}
    for name in SUMMARY_FIGURES:
        for when, metrics in (("before", before), ("after", after)):
            fields.update(metrics.estimate(name).fields(f"{name}_{when}"))
    fields.update(drop(before, after, "clean_acc_full").fields("clean_acc_full_drop"))
    fields.update(drop(before, after, "clean_acc").fields("clean_acc_drop"))
    return fields


def der_fields(before: Metrics, after: Metrics) -> dict:
    """DER, or null with the reason where a figure it needs was not measured."""
    if all(math.isfinite(m.asr) and math.isfinite(m.clean_acc_full) for m in (before, after)):
        return {"der": defense_effectiveness(before, after)}
    return {"der": None, "der_reason": "needs the ASR and the full-test clean accuracy before and after"}


def holdout_after(pruning: Pruning) -> Estimate:
    """The chosen step's accuracy on the rule's images (the unpruned model's when nothing was
    pruned; not measured with a fixed --threshold, which is not a step of the schedule)."""
    index = pruning.choice.index
    if pruning.chosen is None:
        return pruning.holdout.estimate()
    if index is None:
        return Estimate(None, 0, None, "a fixed --threshold is not scored on the rule's images")
    return pruning.holdout.estimate(index)


def engine_summary(run: ResolvedRun, compile_warm: bool) -> dict:
    """What ran accelerated, and whether compiled code came warm from this process's cache."""
    engine = run.engine
    return {
        "compile": engine.compile,
        "cuda_graphs": engine.cuda_graphs,
        "amp": str(engine.amp).removeprefix("torch.") if engine.amp else None,
        "compile_cache": ("warm, in-process" if compile_warm else "cold") if engine.compile else None,
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
        **provenance(device),
    }
