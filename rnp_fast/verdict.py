"""Did the defense work? One verdict, the same for a single defense and for `--repeats`.

A defense succeeds when the attack success rate after it is at most ``Goal.max_asr`` and it cost at
most ``Goal.max_clean_drop`` of clean accuracy on the full test set (before minus after, on the same
images). `judge` gives the verdict with both figures, their numbers of images and 95 % intervals
(Wilson for the ASR, Newcombe's paired interval for the drop: `evaluation.intervals`), which
criterion failed, and whether each interval lies wholly on the side of its limit that the figure
does: with 599 test images a 2-point drop is 12 images and its interval about +-1.7 points, so a
verdict can be a coin toss, and the summary says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnp_fast.config import SLACK, Goal
from rnp_fast.evaluation.intervals import Estimate
from rnp_fast.evaluation.metrics import Metrics, drop

WORDS = {"asr_after": "ASR", "clean_acc_full_drop": "clean drop", "clean_acc_drop": "clean drop"}  # for the log


@dataclass(frozen=True)
class Criterion:
    """One criterion of the verdict: the figure, its limit, whether it is met, and whether its
    95 % interval agrees (lies wholly on the same side of the limit)."""

    name: str
    figure: Estimate
    limit: float
    met: bool

    @property
    def certain(self) -> bool | None:
        if self.figure.ci95 is None:
            return None
        lo, hi = self.figure.ci95
        return hi <= self.limit + SLACK if self.met else lo > self.limit + SLACK

    def as_dict(self) -> dict:
        return {
            "value": self.figure.value,
            "n": self.figure.n,
            "ci95": list(self.figure.ci95) if self.figure.ci95 else None,
            "limit": self.limit,
            "met": self.met,
            "interval_agrees": self.certain,
        }


@dataclass(frozen=True)
class Verdict:
    success: bool
    asr: Criterion
    clean_drop: Criterion
    goal: Goal
    full: bool  # the drop of full-test clean accuracy (False: non-target clean accuracy)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in (self.asr, self.clean_drop) if not c.met]

    def as_dict(self) -> dict:
        return {
            "success": self.success,
            "failed": self.failed,
            "uncertain": [c.name for c in (self.asr, self.clean_drop) if c.certain is False],
            "goal": self.goal.as_dict(),
            self.asr.name: self.asr.as_dict(),
            self.clean_drop.name: self.clean_drop.as_dict(),
            "text": self.describe(),
        }

    def describe(self) -> str:
        """One line for the log: the verdict, both figures with their intervals and limits."""
        asr, loss = self.asr, self.clean_drop
        which = "full-test" if self.full else "non-target"
        failed = " and ".join(WORDS[c.name] for c in (asr, loss) if not c.met)
        doubt = " and ".join(WORDS[c.name] for c in (asr, loss) if c.certain is False)
        return (
            f"{'success' if self.success else 'no success'}"
            + (f" ({failed} failed)" if failed else "")
            + f": ASR after {asr.figure.text(3)} {'<=' if asr.met else '>'} {self.goal.max_asr:g}; "
            f"{which} clean drop {loss.figure.text(1, 100, ' points')} {'<=' if loss.met else '>'} "
            f"{self.goal.max_clean_drop * 100:g}"
            + (f"; uncertain: the 95 % interval of the {doubt} straddles its limit" if doubt else "")
        )


def judge(before: Metrics, after: Metrics, goal: Goal, full: bool = True) -> Verdict | None:
    """The verdict on a defense from its metrics before and after (``full``: the drop of full-test
    clean accuracy, else of non-target clean accuracy); None where a figure it needs was not
    measured (`unjudged` says why)."""
    asr = after.estimate("asr")
    loss = drop(before, after, "clean_acc_full" if full else "clean_acc")
    if asr.value is None or loss.value is None:
        return None
    asr_criterion = Criterion("asr_after", asr, goal.max_asr, goal.asr_met(asr.value))
    name = "clean_acc_full_drop" if full else "clean_acc_drop"
    drop_criterion = Criterion(name, loss, goal.max_clean_drop, goal.drop_met(loss.value))
    return Verdict(asr_criterion.met and drop_criterion.met, asr_criterion, drop_criterion, goal, full)


def unjudged(before: Metrics, after: Metrics) -> str:
    """Why `judge` gave no verdict."""
    asr = after.estimate("asr")
    loss = drop(before, after)
    return f"no verdict: {asr.reason or loss.reason}"
