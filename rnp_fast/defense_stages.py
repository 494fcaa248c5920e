"""The stages of a defense, each a function returning a small frozen result with its own timing.

`defense.compute_defense` calls them in order: load the defense data, (the reference mode's
separate "before" evaluation), unlearn, recover, score the candidates on held-out clean data,
choose, score the candidates on the test sets, purify. No stage fills in anything of its caller's:
what a stage measured (seconds, stop epoch, compile warmth) is a field of what it returns, and
`Timings` gathers them for the summary.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace

from torch import nn

from rnp_fast.data import DefenseData, defense_data
from rnp_fast.errors import UserError
from rnp_fast.evaluation.metrics import Metrics, drop
from rnp_fast.evaluation.scoring import HoldoutScores, holdout_accuracies, score_steps
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d
from rnp_fast.prune import Channel, PruneStep, prune_, rank_channels, schedule, single_threshold_step
from rnp_fast.recover import recover
from rnp_fast.report import EPOCH_HEADER, epoch_row
from rnp_fast.resolved import ResolvedRun
from rnp_fast.rule_power import rule_warning
from rnp_fast.runlog import RunLog
from rnp_fast.select import Choice, choose_step
from rnp_fast.unlearn import unlearn
from rnp_fast.verdict import judge, unjudged

UNPRUNED = PruneStep(label=float("nan"), count=0, channels=[])


@dataclass(frozen=True)
class Inputs:
    """The models and masks a defense starts from (checked before the run directory exists)."""

    backdoored: nn.Module
    unlearned: nn.Module | None = None
    channels: list[Channel] | None = None


# -- what each stage returns ----------------------------------------------------------------


@dataclass(frozen=True)
class LoadedData:
    data: DefenseData
    loader: object  # the training part's loader, shared by unlearning and recovering
    seconds: float  # from the run's start: resolution, model loading, test sets, the subset


@dataclass(frozen=True)
class Before:
    """The reference mode's separate evaluation of the backdoored model (None in the fast mode,
    where "before" is a candidate of the scoring pass)."""

    metrics: Metrics | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class LearningTime:
    """One learning stage's time: training (per-epoch evaluation excluded), its accelerated step's
    first call (compilation or capture), the per-epoch evaluation, and the waits for batches."""

    seconds: float
    first_step_seconds: float
    eval_seconds: float
    batch_seconds: float


@dataclass(frozen=True)
class Unlearned:
    model: nn.Module | None  # None: masks were given, nothing is learned
    stop_epoch: int | None = None  # None: unlearning did not run
    reached_threshold: bool | None = None
    diverged_epoch: int | None = None
    compile_warm: bool = False  # the unlearning step came compiled from this process's cache
    time: LearningTime | None = None


@dataclass(frozen=True)
class Recovered:
    channels: list[Channel]  # every BatchNorm channel with its mask value, in module order
    time: LearningTime | None = None  # None: the masks were given


@dataclass(frozen=True)
class Candidates:
    """The pruning schedule and each step's clean accuracy on the threshold rule's images."""

    ranked: list[Channel]
    steps: list[PruneStep]
    holdout: HoldoutScores  # overall and per class; the unpruned model's, then per step
    rule_data: str  # what the threshold rule scores: held-out or (none held out) training images
    seconds: float


@dataclass(frozen=True)
class Chosen:
    choice: Choice
    step: PruneStep | None  # None: nothing pruned


@dataclass(frozen=True)
class Pruning:
    """What scoring the schedule gives: per-step metrics, the choice, and before/after."""

    steps: list[PruneStep]
    metrics: list[Metrics]
    holdout: HoldoutScores
    choice: Choice
    chosen: PruneStep | None
    before: Metrics
    after: Metrics
    seconds: float  # the candidates' scoring, the reference mode's separate "after" excluded
    after_seconds: float | None = None  # the reference mode's separate "after" evaluation


@dataclass(frozen=True)
class Timings:
    """Seconds per phase, as summary.json's ``timings`` lists them (a phase that did not run is absent)."""

    data: float
    model_eval: float | None = None  # the reference mode's separate before + after evaluations
    unlearn: float | None = None
    unlearn_first_step: float | None = None
    recover: float | None = None
    recover_first_step: float | None = None
    epoch_eval: float | None = None
    batches: float | None = None  # part of unlearn and recover
    after_eval: float | None = None
    prune_eval: float | None = None
    total: float | None = None

    @classmethod
    def of(cls, data: LoadedData, before: Before, unlearned: Unlearned, recovered: Recovered, pruning: Pruning):
        learning = [t for t in (unlearned.time, recovered.time) if t is not None]
        model_eval = [s for s in (before.seconds, pruning.after_seconds) if s is not None]
        return cls(
            data=data.seconds,
            model_eval=sum(model_eval) if model_eval else None,
            unlearn=unlearned.time.seconds if unlearned.time else None,
            unlearn_first_step=unlearned.time.first_step_seconds if unlearned.time else None,
            recover=recovered.time.seconds if recovered.time else None,
            recover_first_step=recovered.time.first_step_seconds if recovered.time else None,
            epoch_eval=sum(t.eval_seconds for t in learning) if recovered.time else None,
            batches=sum(t.batch_seconds for t in learning) if recovered.time else None,
            after_eval=pruning.after_seconds,
            prune_eval=pruning.seconds,
        )

    def as_dict(self) -> dict[str, float]:
        return {name: seconds for name, seconds in asdict(self).items() if seconds is not None}


# -- the stages ---------------------------------------------------------------------------------


def load_defense_data(
    job, run: ResolvedRun, seed: int | None, log: RunLog, started: float, order_seed: int | None = None
) -> LoadedData:
    """The seeded subset (``seed``: the data section's unless given) and its loader (``order_seed``:
    its order and augmentation, default ``seed``'s); the test sets are poisoned and placed now, so
    that their time is part of "data"."""
    log.info("----------- Data Initialization --------------")
    run.tests  # noqa: B018 - built on first use
    data = defense_data(run.source, job.data if seed is None else replace(job.data, seed=seed))
    seconds = time.perf_counter() - started
    log.info("----------- Backdoor Model Initialization --------------")
    log.info(f"{len(data.train)} defense images, {len(data.holdout)} held out")
    if job.data.batch_size > len(data.train):  # said, not silently clipped (issue 23)
        log.info(f"--batch-size {job.data.batch_size} > {len(data.train)} defense images: batches of {len(data.train)}")
    return LoadedData(data, run.defense_loader(data.train, seed if order_seed is None else order_seed), seconds)


def reference_before(job, run: ResolvedRun, backdoored: nn.Module, log: RunLog) -> Before:
    """The reference mode scores the backdoored model first, on its own, as the reference does."""
    if job.engine.mode != "reference":
        return Before()
    tick = time.perf_counter()
    before = run.evaluator()(backdoored)
    seconds = time.perf_counter() - tick
    log.info(f"before defense: {figures_text(before)}")
    return Before(before, seconds)


def unlearn_stage(job, run: ResolvedRun, inputs: Inputs, loaded: LoadedData, log: RunLog) -> Unlearned:
    """Unlearning, unless an unlearned model (or the masks themselves) were given."""
    if inputs.channels is not None or inputs.unlearned is not None:
        return Unlearned(inputs.unlearned if inputs.channels is None else None)
    tick = time.perf_counter()
    log.info(EPOCH_HEADER)
    log.info("----------- Model Unlearning --------------")
    reporter = EpochReporter(log, run.epoch_evaluator(), eval_every(job))
    bar = log.bar(job.rnp.unlearning_epochs + 1, "unlearning")
    result = unlearn(inputs.backdoored, loaded.loader, job.rnp, reporter.callback(bar), run.engine)
    bar.close()
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
    spent = reporter.spent(tick, result.step_timings.first_call_seconds)
    warm = result.step_timings.warm
    return Unlearned(result.model, result.stop_epoch, result.reached_threshold, result.diverged_epoch, warm, spent)


def recover_stage(job, run: ResolvedRun, inputs: Inputs, unlearned: Unlearned, loaded: LoadedData, log) -> Recovered:
    """Recovering the masks on the unlearned model, unless the masks were given."""
    if inputs.channels is not None:
        return Recovered(inputs.channels)
    tick = time.perf_counter()
    log.info("----------- Model Recovering --------------")
    log.info(EPOCH_HEADER)
    reporter = EpochReporter(log, run.epoch_evaluator(), eval_every(job))
    masked = run.new_model(MaskedBatchNorm2d)
    sample = next(iter(loaded.loader))[0] if run.engine.bn_kernel == "auto" else None
    bar = log.bar(job.rnp.recovering_epochs, "recovering")
    result = recover(masked, unlearned.model, loaded.loader, job.rnp, reporter.callback(bar), run.engine, sample)
    bar.close()
    bad = [c for c in result.channels if not math.isfinite(c.value)]  # one float each: no tensor per channel
    if bad:
        raise UserError(
            f"recovering produced non-finite masks (e.g. {bad[0].layer}[{bad[0].index}]); lower --recovering-lr"
        )
    return Recovered(result.channels, reporter.spent(tick, result.step_timings.first_call_seconds))


def eval_every(job) -> int:
    """Per-epoch evaluation every N epochs (0: never); the reference mode evaluates every epoch."""
    return job.engine.eval_every if job.engine.eval_every or job.engine.mode == "fast" else 1


def score_candidates(job, run: ResolvedRun, backdoored: nn.Module, channels, data: DefenseData, log) -> Candidates:
    """The schedule over the ranked masks, each step scored on the threshold rule's clean images."""
    tick = time.perf_counter()
    log.info("----------- Backdoored Model Pruning --------------")
    ranked = rank_channels(channels)
    steps = schedule(ranked, job.rnp.pruning_by, job.rnp.pruning_max, job.rnp.pruning_step)
    scoring = run.scoring(log.info)
    holdout = holdout_accuracies(backdoored, steps, data.rule_images, run.mean, run.std, scoring, run.num_classes)
    return Candidates(ranked, steps, holdout, data.rule_data, time.perf_counter() - tick)


def choose(job, candidates: Candidates) -> Chosen:
    """The threshold rule on clean held-out accuracy, or the fixed --threshold."""
    if job.rnp.threshold is not None:
        step = single_threshold_step(candidates.ranked, job.rnp.threshold)
        return Chosen(Choice(None, f"fixed --threshold {job.rnp.threshold}"), step)
    labels = [step.label for step in candidates.steps]
    holdout, tolerance = candidates.holdout, job.rnp.tolerance
    choice = choose_step(holdout.per_step, holdout.base, tolerance, labels, candidates.rule_data, holdout.n)
    choice.warning = rule_warning(holdout.estimate(), tolerance, candidates.rule_data)
    return Chosen(choice, candidates.steps[choice.index] if choice.index is not None else None)


def score_tests(job, run, backdoored, candidates: Candidates, chosen: Chosen, before: Before, log) -> Pruning:
    """Every step's test-set metrics, and before/after: in the fast mode the unpruned and the
    chosen model are candidates of the same pass; the reference mode evaluates "after" apart."""
    tick = time.perf_counter()
    steps, scoring, after_seconds = candidates.steps, run.scoring(log.info), None
    if before.metrics is None:
        extra = [chosen.step] if chosen.step is not None else []
        scored = score_steps(backdoored, [UNPRUNED, *steps, *extra], run.tests, scoring)
        before_metrics, metrics = scored[0], scored[1 : 1 + len(steps)]
        after = scored[-1] if chosen.step is not None else before_metrics
    else:
        before_metrics, metrics = before.metrics, score_steps(backdoored, steps, run.tests, scoring)
        after, after_seconds = separate_after(run, backdoored, chosen.step)
    seconds = candidates.seconds + time.perf_counter() - tick - (after_seconds or 0.0)
    log_pruning(job, candidates, metrics, chosen, before_metrics, after, log)
    holdout = candidates.holdout
    return Pruning(steps, metrics, holdout, chosen.choice, chosen.step, before_metrics, after, seconds, after_seconds)


def separate_after(run: ResolvedRun, backdoored: nn.Module, chosen: PruneStep | None) -> tuple[Metrics, float]:
    tick = time.perf_counter()
    after = run.evaluator()(purify(backdoored, chosen))
    return after, time.perf_counter() - tick


def log_pruning(job, candidates: Candidates, metrics, chosen: Chosen, before: Metrics, after: Metrics, log) -> None:
    counts = f"{before.estimate('asr').n} triggered and {before.estimate('clean_acc').n} non-target clean test images"
    log.info(f"every step scored on {counts} (95 % intervals in brackets)")
    for step, metric in zip(candidates.steps, metrics, strict=True):
        asr, clean = metric.estimate("asr"), metric.estimate("clean_acc")
        log.info(
            f"{step.label:.4g} \t pruned {step.count} \t ASR {metric.asr:.4f} {interval(asr)} \t "
            f"clean {metric.clean_acc:.4f} {interval(clean)}"
        )
    if job.rnp.threshold is None and candidates.rule_data == "training images":
        log.info(
            "WARNING: no defense images are held out (--holdout), so the threshold is chosen on the training images"
        )
    log.info(f"threshold rule: {chosen.choice.rule}")
    if chosen.choice.warning:
        log.info(f"WARNING: {chosen.choice.warning}")
    log.info(f"before defense: {figures_text(before)}")
    count = chosen.step.count if chosen.step else 0
    log.info(f"after defense: {figures_text(after)}, {count} pruned")
    full, nontarget = drop(before, after, "clean_acc_full"), drop(before, after, "clean_acc")
    log.info(f"clean drop: full test {full.text(2, 100, ' points')}, non-target {nontarget.text(2, 100, ' points')}")
    verdict = judge(before, after, job.goal)
    log.info(f"verdict: {verdict.describe() if verdict else unjudged(before, after)}")


def interval(estimate) -> str:
    return "" if estimate.ci95 is None else f"[{estimate.ci95[0]:.3f}, {estimate.ci95[1]:.3f}]"


def figures_text(metrics: Metrics) -> str:
    """Clean accuracy (non-target, then all classes) and ASR with their intervals and counts."""
    clean, full, asr = (metrics.estimate(name) for name in ("clean_acc", "clean_acc_full", "asr"))
    return f"clean {clean.text()} (all classes {full.text()}), ASR {asr.text()}"


def purify(backdoored: nn.Module, chosen: PruneStep | None) -> nn.Module:
    """A copy of the backdoored model with the chosen channels' BatchNorm gamma zeroed."""
    return prune_(copy.deepcopy(backdoored), chosen.channels if chosen else [])


class EpochReporter:
    """Logs the reference's per-epoch row, evaluating both test sets every ``eval_every`` epochs,
    and keeps the evaluation's time (and the waits for batches) apart from training's."""

    def __init__(self, log: RunLog, evaluator, eval_every: int):
        self.log, self.evaluator, self.eval_every = log, evaluator, eval_every
        self.eval_seconds = 0.0
        self.batch_seconds = 0.0  # time the training loop waited for batches

    def evaluate(self, model):
        tick = time.perf_counter()
        metrics = self.evaluator(model)
        self.eval_seconds += time.perf_counter() - tick
        return metrics

    def callback(self, bar):
        def on_epoch(model, stats):
            due = self.eval_every and stats.epoch % self.eval_every == 0
            metrics = self.evaluate(model) if due else None
            self.batch_seconds += stats.data_seconds
            self.log.info(epoch_row(stats.epoch, stats.lr, stats.seconds, stats.loss, stats.acc, metrics))
            bar.update(1)

        return on_epoch

    def spent(self, started: float, first_step_seconds: float) -> LearningTime:
        """The stage's time since ``started``, its evaluation excluded."""
        training = time.perf_counter() - started - self.eval_seconds
        return LearningTime(training, first_step_seconds, self.eval_seconds, self.batch_seconds)
