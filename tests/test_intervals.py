"""The 95 % intervals against published worked values, the figures built on them, and the verdict."""

from __future__ import annotations

import math

import pytest
import torch

from rnp_fast.config import Goal
from rnp_fast.errors import UserError
from rnp_fast.evaluation.intervals import Estimate, PairedTable, paired_difference, wilson
from rnp_fast.evaluation.metrics import ImageOutcomes, Metrics, drop
from rnp_fast.verdict import judge

# Newcombe (1998a), Statistics in Medicine 17:857-872, Table II, method 3 (the Wilson score interval).
NEWCOMBE_1998A_WILSON = [((81, 263), (0.2553, 0.3662)), ((15, 148), (0.0624, 0.1605)), ((0, 20), (0.0, 0.1611))]
NEWCOMBE_1998A_WILSON += [((1, 29), (0.0061, 0.1718))]


@pytest.mark.parametrize("counts, published", NEWCOMBE_1998A_WILSON)
def test_wilson_matches_newcombes_published_intervals(counts, published):
    lo, hi = wilson(*counts)
    assert (round(lo, 4), round(hi, 4)) == published


def test_wilson_is_not_empty_at_zero_or_all_and_says_nothing_without_images():
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] > 0.25  # +-SE would say [0, 0]
    assert wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] < 0.75
    assert wilson(0, 0) is None


def test_paired_difference_matches_the_published_square_and_add_interval():
    """Cavo et al. (2012) as Fagerland, Lydersen and Laake (2017, "Statistical Analysis of
    Contingency Tables", chapter 8; also Stat Med 2014, 33:2850) give it: the table [[59, 6],
    [16, 80]], difference -0.0621, Newcombe's square-and-add interval -0.1186 to -0.0046."""
    table = PairedTable(both=59, lost=6, gained=16, neither=80)
    lo, hi = paired_difference(table)
    assert round(table.difference, 4) == -0.0621
    assert (round(lo, 4), round(hi, 4)) == (-0.1186, -0.0046)


def test_paired_difference_is_narrower_than_independent_and_mirrors():
    table = PairedTable(both=570, lost=25, gained=5, neither=0)  # 599 images: a 3.3-point drop
    lo, hi = paired_difference(table)
    assert lo < table.difference < hi and lo > 0  # 25 lost against 5 gained: a real drop
    mirrored = paired_difference(PairedTable(both=570, lost=5, gained=25, neither=0))
    assert mirrored == pytest.approx((-hi, -lo))
    assert paired_difference(PairedTable(0, 0, 0, 0)) is None
    unchanged = paired_difference(PairedTable(both=590, lost=0, gained=0, neither=10))
    assert unchanged[0] < 0 < unchanged[1]  # no discordant image: the drop is 0, still with its interval


def outcomes(clean: list[bool], non_target: list[bool], hits: list[bool], robust: list[bool] | None) -> ImageOutcomes:
    as_tensor = lambda values: torch.tensor(values, dtype=torch.bool)  # noqa: E731
    return ImageOutcomes(as_tensor(clean), as_tensor(non_target), as_tensor(hits), robust and as_tensor(robust))


def metrics(clean: list[bool], hits: list[bool], robust: list[bool] | None = None) -> Metrics:
    non_target = [True] * (len(clean) - 2) + [False, False]
    images = outcomes(clean, non_target, hits, robust)
    kept = [c for c, keep in zip(clean, non_target, strict=True) if keep]
    rate = lambda values: sum(values) / len(values) if values else math.nan  # noqa: E731
    robust_acc = rate(robust) if robust is not None else math.nan
    return Metrics(rate(kept), 0.0, rate(hits), 0.0, rate(clean), robust_acc, images)


def test_every_figure_carries_its_count_and_interval_and_a_reason_when_unmeasured():
    before = metrics([True] * 98 + [False, True], [True] * 50, robust=None)
    full = before.estimate("clean_acc_full")
    assert (full.value, full.n, full.ci95) == (0.99, 100, wilson(99, 100))
    assert before.estimate("clean_acc").n == 98  # the non-target images only
    robust = before.estimate("robust_acc")
    assert robust.value is None and robust.n == 0 and "true labels" in robust.reason
    assert robust.fields("robust_acc_before") == {
        "robust_acc_before": None,
        "robust_acc_before_n": 0,
        "robust_acc_before_ci95": None,
        "robust_acc_before_reason": robust.reason,
    }
    no_trigger = metrics([True] * 10, [])
    assert no_trigger.estimate("asr").reason == "no triggered test images"


def test_the_drop_is_paired_on_the_same_images():
    before = metrics([True] * 100, [True] * 50)
    after = metrics([True] * 95 + [False] * 5, [False] * 50)
    loss = drop(before, after)
    assert loss.value == pytest.approx(0.05) and loss.n == 100
    assert loss.ci95 == pytest.approx(paired_difference(PairedTable(95, 5, 0, 0)))


def test_the_verdict_names_the_failed_criterion_and_its_doubt():
    before = metrics([True] * 599, [True] * 540)
    after = metrics([True] * 579 + [False] * 20, [False] * 540)  # a 3.3-point drop, no ASR left
    verdict = judge(before, after, Goal())
    assert not verdict.success and verdict.failed == ["clean_acc_full_drop"]
    assert verdict.asr.certain is True  # 0 of 540: the interval lies below 0.1
    as_dict = verdict.as_dict()
    assert as_dict["clean_acc_full_drop"]["n"] == 599 and len(as_dict["clean_acc_full_drop"]["ci95"]) == 2
    assert "(clean drop failed)" in verdict.describe() and "points of 599 images > 2" in verdict.describe()
    lenient = judge(before, after, Goal(max_clean_drop=0.04))
    assert lenient.success and lenient.as_dict()["uncertain"] == ["clean_acc_full_drop"]  # 3.3 [2.1, 5.1] vs 4
    assert judge(before, metrics([True] * 599, []), Goal()) is None  # no triggered images: nothing to judge


def test_a_figure_made_by_hand_has_no_count():
    bare = Metrics(0.9, 0.0, 0.1, 0.0, 0.9, 0.5)
    assert bare.estimate("asr") == Estimate(0.1, None, None)
    assert judge(bare, Metrics(0.9, 0.0, 0.0, 0.0, 0.89, 0.5), Goal()).success


@pytest.mark.parametrize(
    "asr, clean_drop, message",
    [
        (1.5, 0.02, "--success-asr must be a number in [0, 1]"),
        (math.nan, 0.02, "--success-asr"),
        (0.1, -0.01, "--success-clean-drop must be a finite number >= 0"),
        (0.1, math.inf, "--success-clean-drop"),
    ],
)
def test_the_goal_is_checked(asr, clean_drop, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Goal(asr, clean_drop)


@pytest.mark.parametrize("flags", [["--success-asr", "nan"], ["--success-asr", "1.5"], ["--success-clean-drop", "-1"]])
def test_bad_success_limits_are_one_line_exit_2_before_any_work(flags, tmp_path, capsys):
    from rnp_fast.cli import main

    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "--success-" in err and len(err.splitlines()) == 1 and not out.exists()
