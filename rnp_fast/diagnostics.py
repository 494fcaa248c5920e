"""Target-class diagnostics from clean data only (beyond the paper).

Two things a defender can see without a single triggered image:

- The unlearned model's predicted-class histogram on the clean held-out images. Gradient ascent
  pushes the model away from the clean labels and it falls onto one class: the collapse class.
  On a backdoored model that is often the backdoor's target (the trigger's ready-made shortcut),
  but clean models collapse onto one class too, so it names a class, not a verdict: what it was
  worth on the digits testbed is `COLLAPSE_CLASS_WORTH` (benchmarks/clean_verdict_study.py).
- Clean accuracy per class at every pruning candidate. Recovering from that collapse also lowers
  masks on channels the target class itself needs, so a threshold can remove the backdoor and the
  target class's accuracy together: the per-class columns show which class a threshold hurts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp_fast.evaluation.predict import predict
from rnp_fast.loaders.augment import normalisation
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.prune import PruneStep

# What the collapse class was worth on the study's digits models (benchmarks/results/
# clean_verdict_digits_cpu.json): said with it in the log and in diagnostics.json.
COLLAPSE_CLASS_WORTH = (
    "not a backdoor verdict: on digits it was the backdoor's target for 6 of 13 backdoored "
    "models, and clean models collapse onto one class too (docs/efficacy.md)"
)


@dataclass
class ClassHistogram:
    """How many clean images a model assigns to each class, and the class it favours."""

    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def top_class(self) -> int:
        return max(range(len(self.counts)), key=lambda c: self.counts[c])

    @property
    def top_share(self) -> float:
        return self.counts[self.top_class] / self.total if self.total else float("nan")

    def describe(self) -> str:
        return (
            f"unlearned model's predictions on {self.total} clean held-out images: class {self.top_class} takes "
            f"{self.top_share:.0%}, the class unlearning collapses onto; {COLLAPSE_CLASS_WORTH}; "
            f"histogram {self.counts}"
        )

    def as_dict(self) -> dict:
        """The histogram for diagnostics.json; with no images counted there is no collapse class
        (null, as JSON has no NaN)."""
        return {
            "counts": self.counts,
            "collapse_class": self.top_class if self.total else None,
            "collapse_class_share": self.top_share if self.total else None,
            "collapse_class_worth": COLLAPSE_CLASS_WORTH,
        }


def predicted_class_histogram(
    model: nn.Module, images: ImageSet, mean, std, num_classes: int, batch_size: int = 512
) -> ClassHistogram:
    """Predicted-class counts of ``model`` (eval mode, running statistics) over ``images``."""
    device = next(model.parameters()).device
    mean_t, std_t = normalisation(mean, std, device)
    was_training = model.training
    logits = predict(model, images.images.to(device), mean_t, std_t, batch_size)
    model.train(was_training)
    counts = torch.bincount(logits.argmax(1).cpu(), minlength=num_classes)
    return ClassHistogram(counts.tolist())


@dataclass
class TargetReport:
    """What the diagnostics add to a defense: the collapse class and per-class held-out accuracy."""

    histogram: ClassHistogram | None  # None: no unlearning ran (masks were given)
    base: list[float]  # the unpruned model's held-out accuracy per class
    per_step: list[list[float]]  # per pruning step, per class
    per_class_n: list[int] = field(default_factory=list)  # held-out images of each class

    def as_dict(self, labels: list[float]) -> dict:
        """The JSON of diagnostics.json: a class without held-out images has accuracy null (JSON
        has no NaN), its count 0 saying why."""
        return {
            "unlearned_prediction_histogram": self.histogram.as_dict() if self.histogram else None,
            "holdout_images_per_class": self.per_class_n,
            "holdout_acc_per_class_unpruned": finite_or_none(self.base),
            "holdout_acc_per_class": [
                {"label": label, "per_class": finite_or_none(row)}
                for label, row in zip(labels, self.per_step, strict=True)
            ],
        }


def finite_or_none(values: list[float]) -> list[float | None]:
    return [value if math.isfinite(value) else None for value in values]


def target_report(defense) -> TargetReport:
    """The diagnostics of a computed defense (`defense.Defense`): the unlearned model's histogram on
    the rule's clean images, and every candidate's per-class accuracy on them (from the scoring pass
    that chose the threshold: nothing is scored twice)."""
    run, images = defense.run, defense.loaded.data.rule_images
    unlearned = defense.unlearned.model
    histogram = None
    if unlearned is not None:
        histogram = predicted_class_histogram(unlearned, images, run.source.mean, run.source.std, run.num_classes)
    holdout = defense.pruning.holdout
    return TargetReport(histogram, holdout.base_per_class, holdout.per_step_per_class, holdout.per_class_n)


def plot_per_class(path, labels: list[float], report: TargetReport, chosen: int | None, by: str) -> None:
    """Held-out accuracy of every class against the threshold, the collapse class bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    collapse = report.histogram.top_class if report.histogram else None
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    for cls in range(len(report.base)):
        ys = [row[cls] for row in report.per_step]
        bold = cls == collapse
        axes.plot(
            labels,
            ys,
            "o-" if bold else "-",
            linewidth=2.5 if bold else 1,
            alpha=1 if bold else 0.6,
            label=f"class {cls}" + (" (collapse class)" if bold else ""),
        )
    if chosen is not None:
        axes.axvline(labels[chosen], color="gray", linestyle=":", label="chosen")
    axes.set_xlabel("pruning threshold" if by == "threshold" else "channels pruned")
    axes.set_ylabel("held-out clean accuracy")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_diagnostics(out, report: TargetReport, steps: list[PruneStep], chosen: int | None, by: str) -> None:
    """``diagnostics.json`` (histogram, per-class held-out accuracy per step) and ``per_class.png``
    into a run directory (`outputs.RunDirectory`)."""
    labels = [step.label for step in steps]
    out.write_json("diagnostics.json", report.as_dict(labels))
    plot_per_class(out.path("per_class.png"), labels, report, chosen, by)


def target_diagnostics(defense, log) -> TargetReport:
    """`target_report`, with its findings in the run's log: the collapse class and, at the
    chosen step, the class whose held-out accuracy fell most."""
    report = target_report(defense)
    if report.histogram is not None:
        log.info(report.histogram.describe())
    index = defense.pruning.choice.index
    if index is not None:
        drops = [base - after for base, after in zip(report.base, report.per_step[index], strict=True)]
        worst = max(range(len(drops)), key=lambda c: drops[c] if drops[c] == drops[c] else float("-inf"))
        if drops[worst] > 0:  # a line only for a change: "1.000 -> 1.000" said nothing
            counts = f" of {report.per_class_n[worst]} images" if report.per_class_n else ""
            log.info(
                f"at the chosen step, class {worst}'s held-out accuracy fell most: "
                f"{report.base[worst]:.3f} -> {report.per_step[index][worst]:.3f}{counts} (per class: diagnostics.json)"
            )
        else:
            log.info("at the chosen step no class's held-out accuracy fell (per class: diagnostics.json)")
    return report
