"""The defense over N defense-data seeds: how often it works, not whether one run did.

On a small model RNP is sensitive to which clean images form the defense set (and to their order
and augmentation, which the same seed draws): one run cannot tell a lucky seed from a working
defense. `run_repeats` resolves the run, loads the model and the test sets once and calls the
defense once per seed (`defense.compute_defense(..., seed=s)`, compiled steps reused; with
``over="order"``, ``order_seed=s``: the same defense images, only their order and augmentation
drawn), then reports per seed and in aggregate. On a CPU the seeds run side by side instead, one
worker process with one torch thread per core available (`seed_processes`, `--jobs-per-device`):
each seed's result is the one that seed gives defended alone with one thread, and the summary
states the processes and threads that ran. Per seed and in aggregate:

- ASR and clean accuracy (non-target and full test set) after pruning at the rule's threshold;
- success: ASR <= ``Goal.max_asr`` at a full-test clean drop <= ``Goal.max_clean_drop`` (also on
  non-target clean accuracy), the verdict a single defense gives (`verdict.judge`), and the success
  rate over the seeds with its 95 % Wilson interval;
- whether ANY threshold of the schedule would have succeeded (the ranking found the backdoor, the
  clean-data rule did not pick it), which needs the poisoned test set and so is an analysis, not a
  choice a defender can make.

Files (one run directory, written through `outputs.RunDirectory`): ``summary.json`` (per seed and
aggregate), ``seeds.csv`` (one row per seed) and ``tradeoff.png`` (ASR against full-test clean
accuracy over the schedule, one curve per seed, the rule's choice marked).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass

from rnp_fast.config import Goal
from rnp_fast.evaluation.intervals import wilson
from rnp_fast.evaluation.metrics import Metrics, drop
from rnp_fast.verdict import judge


@dataclass(frozen=True)
class CurvePoint:
    label: float  # threshold (or channel count)
    pruned: int
    asr: float
    clean_acc: float  # non-target (reference protocol)
    clean_acc_full: float


@dataclass(frozen=True)
class SeedOutcome:
    """One seed's defense, as the aggregation needs it."""

    seed: int
    before: Metrics
    after: Metrics
    threshold: float | None
    pruned: int
    curve: list[CurvePoint]
    chosen_index: int | None
    collapse_class: int | None = None  # the unlearned model's top predicted class (diagnostics)
    seconds: float | None = None  # this seed's defense, wall time (data to purified model)

    def success_nontarget(self, goal: Goal) -> bool:
        verdict = judge(self.before, self.after, goal, full=False)
        return verdict is not None and verdict.success

    def any_threshold(self, goal: Goal) -> bool:
        return any(goal.met(self.before.clean_acc_full, p.clean_acc_full, p.asr) for p in self.curve)

    def row(self, goal: Goal) -> dict:
        """The seed's figures (the names of rnp_fast 0.1.0 first, then each figure's n and 95 %
        interval, and which criterion of the verdict failed)."""
        verdict = judge(self.before, self.after, goal)
        return {
            "seed": self.seed,
            "threshold": self.threshold,
            "pruned": self.pruned,
            "asr_before": self.before.asr,
            "asr_after": self.after.asr,
            "clean_acc_before": self.before.clean_acc,
            "clean_acc_after": self.after.clean_acc,
            "clean_acc_full_before": self.before.clean_acc_full,
            "clean_acc_full_after": self.after.clean_acc_full,
            "clean_full_drop": self.before.clean_acc_full - self.after.clean_acc_full,
            "success": verdict is not None and verdict.success,
            "success_nontarget": self.success_nontarget(goal),
            "any_threshold_succeeds": self.any_threshold(goal),
            "collapse_class": self.collapse_class,
            "seconds": self.seconds,
            **self.intervals(),
            "failed": " and ".join(verdict.failed) if verdict else None,
        }

    def intervals(self) -> dict:
        """``NAME_n`` and ``NAME_ci95`` of every figure of the row (the drop's paired)."""
        fields = {}
        for name in ("asr", "clean_acc", "clean_acc_full"):
            for when, metrics in (("before", self.before), ("after", self.after)):
                estimate = metrics.estimate(name)
                fields.update({f"{name}_{when}_n": estimate.n, f"{name}_{when}_ci95": estimate.ci95})
        loss = drop(self.before, self.after)
        return {**fields, "clean_full_drop_n": loss.n, "clean_full_drop_ci95": loss.ci95}


def outcome_of(seed: int, pruning, collapse_class: int | None = None, seconds: float | None = None) -> SeedOutcome:
    """A `SeedOutcome` from a defense's `Pruning` (steps, metrics, choice, chosen, before, after)."""
    curve = [
        CurvePoint(step.label, step.count, m.asr, m.clean_acc, m.clean_acc_full)
        for step, m in zip(pruning.steps, pruning.metrics, strict=True)
    ]
    chosen = pruning.chosen
    return SeedOutcome(
        seed=seed,
        before=pruning.before,
        after=pruning.after,
        threshold=chosen.label if chosen is not None else None,
        pruned=chosen.count if chosen is not None else 0,
        curve=curve,
        chosen_index=pruning.choice.index,
        collapse_class=collapse_class,
        seconds=seconds,
    )


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation, min, max (NaN-free inputs)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def rate(flags: list[bool]) -> dict:
    """A success rate with its 95 % Wilson interval (``std_error``, the binomial standard error, is
    kept for rnp_fast 0.1.0's readers: it is 0 at 0 of N, where the interval is not)."""
    p, count = sum(flags) / len(flags), sum(flags)
    interval = list(wilson(count, len(flags)))
    std_error = math.sqrt(p * (1 - p) / len(flags))
    return {"rate": p, "count": count, "of": len(flags), "std_error": std_error, "ci95": interval}


def aggregate(outcomes: list[SeedOutcome], goal: Goal) -> dict:
    """The per-seed rows and the aggregate over seeds."""
    if not outcomes:
        raise ValueError("no seeds to aggregate")
    rows = [o.row(goal) for o in outcomes]
    return {
        "goal": goal.as_dict(),
        "seeds": [o.seed for o in outcomes],
        "success": rate([r["success"] for r in rows]),
        "success_nontarget": rate([r["success_nontarget"] for r in rows]),
        "any_threshold_succeeds": rate([r["any_threshold_succeeds"] for r in rows]),
        "asr_after": spread([r["asr_after"] for r in rows]),
        "clean_acc_after": spread([r["clean_acc_after"] for r in rows]),
        "clean_acc_full_after": spread([r["clean_acc_full_after"] for r in rows]),
        "clean_full_drop": spread([r["clean_full_drop"] for r in rows]),
        "pruned": spread([float(r["pruned"]) for r in rows]),
        "seconds": spread([r["seconds"] for r in rows]) if all(r["seconds"] is not None for r in rows) else None,
        "per_seed": rows,
    }


def headline(result: dict) -> str:
    """One line a user reads first."""
    goal, success = result["goal"], result["success"]
    lo, hi = success["ci95"]
    return (
        f"success (ASR <= {goal['max_asr']:g}, clean drop <= {goal['max_clean_drop'] * 100:g} points) on "
        f"{success['count']} of {success['of']} seeds ({success['rate']:.0%}, 95 % interval {lo:.0%}-{hi:.0%}); "
        f"on non-target clean accuracy {result['success_nontarget']['count']} of {success['of']}; "
        f"some threshold of the schedule would have succeeded on {result['any_threshold_succeeds']['count']}; "
        f"ASR after {result['asr_after']['mean']:.3f} +- {result['asr_after']['std']:.3f}" + seconds_text(result)
    )


def seconds_text(result: dict) -> str:
    """Each seed's own seconds; with several at once a seed's seconds are a worker's, not the wall's."""
    if not result.get("seconds"):
        return ""
    at_once = result.get("processes", 1)
    return f"; {result['seconds']['mean']:.1f} s per seed" + (f" ({at_once} at once)" if at_once > 1 else "")


def threshold_text(threshold: float | None) -> str:
    return "none" if threshold is None else f"{threshold:.4g}"


def format_seed_table(result: dict) -> str:
    """One line per seed, for the log and the terminal."""
    lines = ["seed \t threshold \t pruned \t ASR \t clean \t clean(all) \t success \t any threshold"]
    for r in result["per_seed"]:
        threshold = threshold_text(r["threshold"])
        lines.append(
            f"{r['seed']} \t {threshold} \t {r['pruned']} \t {r['asr_after']:.4f} \t {r['clean_acc_after']:.4f} \t "
            f"{r['clean_acc_full_after']:.4f} \t {'yes' if r['success'] else 'no'} \t "
            f"{'yes' if r['any_threshold_succeeds'] else 'no'}"
        )
    return "\n".join(lines)


def format_seeds_csv(result: dict) -> str:
    """One row per seed; an interval is two columns, ``NAME_ci95_lo`` and ``NAME_ci95_hi``."""
    rows = [csv_row(row) for row in result["per_seed"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def csv_row(row: dict) -> dict:
    cells = {}
    for name, value in row.items():
        if name.endswith("_ci95"):
            lo, hi = value if value is not None else ("", "")
            cells.update({f"{name}_lo": lo, f"{name}_hi": hi})
        else:
            cells[name] = value
    return cells


def plot_tradeoff(path, outcomes: list[SeedOutcome], goal: Goal) -> None:
    """ASR against full-test clean accuracy over the schedule, one curve per seed; the rule's choice
    is marked, and the success region shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    before = statistics.fmean(o.before.clean_acc_full for o in outcomes)
    ax.axvspan(before - goal.max_clean_drop, 1.0, ymax=goal.max_asr / 1.05, color="tab:green", alpha=0.12)
    for outcome in outcomes:
        xs = [outcome.before.clean_acc_full, *(p.clean_acc_full for p in outcome.curve)]
        ys = [outcome.before.asr, *(p.asr for p in outcome.curve)]
        (line,) = ax.plot(xs, ys, marker=".", linewidth=1, label=f"seed {outcome.seed}")
        ax.plot([outcome.after.clean_acc_full], [outcome.after.asr], "o", color=line.get_color(), markersize=9)
    ax.set_xlabel("clean accuracy, full test set")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("pruning schedule per defense seed\n(big dot: the rule's choice; green area: success)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collapse_class(defense) -> int | None:
    """The unlearned model's top predicted class on the rule's clean images (None: no unlearning)."""
    from rnp_fast.diagnostics import target_report

    histogram = target_report(defense).histogram
    return histogram.top_class if histogram is not None else None


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


OVER = ("data", "order")  # what the seeds vary: the defense data (subset, order, augmentation), or order alone


def defend_seeds(
    job, seeds: list[int], goal: Goal = Goal(), log=None, over: str = "data", processes: int = 1
) -> tuple[list[SeedOutcome], object]:
    """The defense once per seed. ``processes`` 1: one after another in this process (its torch
    threads), the run resolved, the model loaded and the steps compiled once; more: that many
    worker processes with one torch thread each, every one resolving and loading once
    (`seeds_in_workers`). ``over="order"``: the job's defense images every time, each seed drawing
    only their order and augmentation. Returns the outcomes, in ``seeds``' order, and the device."""
    if processes > 1:
        return seeds_in_workers(job, seeds, goal, log, over, processes)
    from rnp_fast.defense import compute_defense, load_inputs
    from rnp_fast.resolved import resolve_run

    run = resolve_run(job.model, job.data, job.attack, job.engine, reuse=len(seeds) > 1)
    inputs = load_inputs(job, run)
    outcomes = []
    for seed in seeds:
        defense = compute_defense(job, run, inputs, log=log, **seeded(seed, over))
        outcomes.append(outcome_of(seed, defense.pruning, collapse_class(defense), defense.seconds))
        log_seed(log, outcomes[-1], goal)
    return outcomes, run.device


def seeded(seed: int, over: str) -> dict:
    return {"order_seed": seed} if over == "order" else {"seed": seed}


def log_seed(log, outcome: SeedOutcome, goal: Goal) -> None:
    if log is None:
        return
    row = outcome.row(goal)
    log.info(
        f"seed {outcome.seed}: threshold {threshold_text(row['threshold'])}, "
        f"{row['pruned']} pruned, ASR {row['asr_after']:.4f}, "
        f"clean {row['clean_acc_after']:.4f} (all classes {row['clean_acc_full_after']:.4f}), "
        f"success {'yes' if row['success'] else 'no'} ({outcome.seconds:.1f} s)"
    )


def seeds_in_workers(job, seeds: list[int], goal: Goal, log, over: str, processes: int):
    """Every seed in a pool of ``processes`` single-threaded workers; each seed's log lines are
    appended to ``log``'s file as it finishes, its summary line shown as in one process."""
    from rnp_fast.device import resolve_device
    from rnp_fast.workers import WorkerPool, worker_result

    device = resolve_device(job.engine.device)
    pool = WorkerPool([str(device)] * processes)
    try:
        pending = {pool.submit(seed_in_worker, job, seed, over): seed for seed in seeds}
        done: dict[int, SeedOutcome] = {}
        while pending:
            outcome, lines = worker_result(pending)
            done[outcome.seed] = outcome
            if log is not None:
                log.append(lines)
            log_seed(log, outcome, goal)
    finally:
        pool.close()
    return [done[seed] for seed in seeds], device


WORKER_THREADS = 1  # torch threads of a worker process: one per core is what fills a CPU
_WORKER_INPUTS: dict = {}  # repr(job) -> (run, inputs): a worker resolves and loads once, for all its seeds


def seed_in_worker(job, seed: int, over: str) -> tuple[SeedOutcome, list[str]]:
    """One seed's defense in a worker process: its outcome and its log lines."""
    import torch

    from rnp_fast.defense import compute_defense, load_inputs
    from rnp_fast.resolved import resolve_run
    from rnp_fast.runlog import RunLog

    torch.set_num_threads(WORKER_THREADS)
    key = repr(job)
    if key not in _WORKER_INPUTS:
        _WORKER_INPUTS.clear()
        run = resolve_run(job.model, job.data, job.attack, job.engine, reuse=True)  # as one process with seeds
        _WORKER_INPUTS[key] = run, load_inputs(job, run)
    run, inputs = _WORKER_INPUTS[key]
    log = RunLog(None, quiet=True, keep=True)
    defense = compute_defense(job, run, inputs, log=log, **seeded(seed, over))
    return outcome_of(seed, defense.pruning, collapse_class(defense), defense.seconds), log.lines


def seed_processes(job, seeds: list[int], requested: int | None):
    """How many seeds run at once (`rnp_fast.capacity`): on a CPU one single-threaded process per
    core available, as many as fit in memory; on a GPU one after another unless ``requested``."""
    from rnp_fast.capacity import available_cores, available_memory, decide, job_memory
    from rnp_fast.device import resolve_device

    device = resolve_device(job.engine.device)
    per_job = job_memory(job.model, job.data, device.type)
    gpus = 1 if device.type == "cuda" else 0
    return decide(requested, available_cores(), len(seeds), per_job, available_memory(), gpus, what="seeds")


def run_repeats(
    job, seeds: list[int], goal: Goal = Goal(), over: str = "data", jobs_per_device: int | None = 1
) -> dict:
    """The defense on every seed of ``seeds``; writes summary.json, seeds.csv, tradeoff.png and
    output.log into ``job.out`` (one run directory, never over a folder rnp-fast did not make).
    ``jobs_per_device``: seeds at once; None: the CLI's default (`seed_processes`: one worker per
    core on a CPU). From Python the default is 1 (this process): workers are spawned processes,
    which re-run the calling script unless its work sits under ``if __name__ == "__main__":``."""
    from rnp_fast.defense import resolved_config
    from rnp_fast.errors import UserError
    from rnp_fast.outputs import DEFENSE_RUN, RunDirectory, vet_output
    from rnp_fast.runlog import RunLog

    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--repeats needs distinct seeds, got {seeds}")
    if over not in OVER:
        raise UserError(f"--repeat-over must be one of {', '.join(OVER)}, got {over!r}")
    vet_output(job.out, job.reads(), kind=DEFENSE_RUN)  # before any work
    with RunDirectory(job.out, job.reads(), kind=DEFENSE_RUN) as out:
        log = RunLog(out.path("output.log"), job.engine.quiet)
        try:
            processes = seed_processes(job, seeds, jobs_per_device)
            threads = WORKER_THREADS if processes.jobs > 1 else torch_threads()
            log.info(
                f"{len(seeds)} seeds, {processes.jobs} at once, {threads} torch thread(s) each: {processes.reason}"
            )
            outcomes, device = defend_seeds(job, seeds, goal, log, over, processes.jobs)
            result = {**aggregate(outcomes, goal), "over": over, "processes": processes.jobs, "threads": threads}
            log.info(format_seed_table(result))
            log.info(headline(result))
        finally:
            log.close()
        out.write_json("summary.json", {"repeats": result, "config": resolved_config(job, device)})
        out.write_text("seeds.csv", format_seeds_csv(result))
        plot_tradeoff(out.path("tradeoff.png"), outcomes, goal)
    return result
