"""Whether the threshold rule can resolve its tolerance on the images it scores.

The rule (`select`) keeps pruning while the held-out accuracy stays within ``--tolerance`` of the
unpruned model's. On n images one image moves that accuracy by 1/n: when 1/n is more than the
tolerance (n < 50 at the default 2 points), one image decides the threshold and the rule cannot
tell a real drop from noise. Such a defense is refused before any work (`check_rule_images`), with
the sizes that would do and the flags that give them, unless the user opts in
(``--allow-small-holdout``) or fixes the threshold (``--threshold``, which needs no hold-out).
Exactly at the bound runs: the counts are whole numbers and 1/tolerance is computed from the
tolerance as written (Fraction("0.02") is 1/50), so 50 held-out images always pass at 0.02.

When the images suffice but the unpruned model's held-out accuracy has a 95 % interval wider
than the tolerance, the defense runs and says so (`rule_warning`).

The sizes are `defense_sizes`, the numbers `data.defense_data` draws; this module imports no
torch, so the command line checks them within a second of starting.
"""

from __future__ import annotations

import math
from fractions import Fraction

from rnp_fast.errors import UserError
from rnp_fast.evaluation.intervals import Estimate, wilson

# Training images of the datasets whose size is fixed (the directory datasets are counted when read).
KNOWN_TRAIN_IMAGES = {"digits": 1198, "cifar10": 50_000, "cifar100": 50_000, "synthetic-cifar10": 50_000}


def defense_sizes(total: int, ratio: float, holdout: float) -> tuple[int, int]:
    """(defense images, of them held out) from ``total`` training images, as `data.defense_data`
    draws them: round(ratio * total), then round(holdout * that)."""
    count = round(ratio * total)
    return count, round(holdout * count)


def rule_images(total: int, ratio: float, holdout: float) -> int:
    """The images the threshold rule scores: the held-out ones, or (none held out) the training ones."""
    count, held = defense_sizes(total, ratio, holdout)
    return held if held else count - held


def images_needed(tolerance: float) -> int | None:
    """The fewest images on which one image is worth no more than ``tolerance`` (n >= 1/tolerance,
    exact: the tolerance as its decimal); None for tolerance 0, which no number of images resolves."""
    if tolerance <= 0:
        return None
    return math.ceil(1 / Fraction(repr(float(tolerance))))


def check_rule_images(total: int, data, rnp, where: str = "") -> None:
    """Refuse (UserError, exit 2) a defense whose threshold rule would choose on too few images
    (``data``: a `DataConfig`, ``rnp``: an `RNPConfig`); ``where``: what to prefix the line with
    (a sweep's job). Nothing to check when the threshold is fixed or the user opted in."""
    if rnp.threshold is not None or rnp.allow_small_holdout:
        return
    n, needed = rule_images(total, data.ratio, data.holdout), images_needed(rnp.tolerance)
    if needed is not None and n >= needed:
        return
    count, held = defense_sizes(total, data.ratio, data.holdout)
    scored = (
        f"{held} held-out image{'s' if held != 1 else ''} (--holdout {data.holdout:g} of {count} defense images, "
        if held
        else f"the {count} training images (--holdout {data.holdout:g}: none held out; "
    )
    scored += f"--ratio {data.ratio:g} of {total:,} training images)"
    if needed is None:
        need = "--tolerance 0 cannot be resolved by any number of images"
    else:
        need = f"one image is worth more than --tolerance {rnp.tolerance:g}, which needs at least {needed}"
        fixes = sizes_that_do(total, data.ratio, data.holdout, needed)
        need += f" ({fixes})" if fixes else f"; the {total:,} training images are too few for that"
    raise UserError(
        f"{where}the threshold rule would choose on {scored}: {need}; or fix the threshold with --threshold "
        "(no hold-out needed), or pass --allow-small-holdout to run anyway"
    )


def sizes_that_do(total: int, ratio: float, holdout: float, needed: int) -> str:
    """The smallest --ratio (at this --holdout) and the smallest --holdout (at this --ratio) whose
    rule images reach ``needed`` with at least 2 images left to train on, as flags."""
    options = []
    ratios = [k / 1000 for k in range(1, 1001) if k / 1000 >= ratio]
    holdouts = [k / 100 for k in range(1, 100) if k / 100 >= holdout]
    for flag, values, sizes in (
        ("--ratio", ratios, lambda r: defense_sizes(total, r, holdout if holdout else 0.1)),
        ("--holdout", holdouts, lambda h: defense_sizes(total, ratio, h)),
    ):
        found = next((v for v in values if sizes(v)[1] >= needed and sizes(v)[0] - sizes(v)[1] >= 2), None)
        if found is not None:
            count, held = sizes(found)
            extra = " --holdout 0.1" if flag == "--ratio" and not holdout else ""
            options.append(f"{flag} {found:g}{extra} holds out {held} of {count} defense images")
    return "e.g. " + ", or ".join(options) if options else ""


def check_known_dataset(data, rnp) -> None:
    """`check_rule_images` for a dataset whose size is known without reading it (the command
    line's check before torch is imported; the defense checks the data it reads again)."""
    total = KNOWN_TRAIN_IMAGES.get(data.dataset)
    if total is not None:
        check_rule_images(total, data, rnp)


def rule_warning(unpruned: Estimate, tolerance: float, data: str) -> str | None:
    """A warning when the unpruned model's accuracy on the rule's images (``unpruned``) has a 95 %
    interval wider than the tolerance: the rule then compares accuracies closer together than their
    own uncertainty. None when the interval is narrower (or nothing was measured)."""
    if unpruned.ci95 is None or unpruned.value is None:
        return None
    width = unpruned.ci95[1] - unpruned.ci95[0]
    if width <= tolerance:
        return None
    wanted = images_for_width(unpruned.value, tolerance)
    more = f"; about {wanted:,} images would narrow it to the tolerance (--ratio, --holdout)" if wanted else ""
    lo, hi = unpruned.ci95
    return (
        f"the unpruned model's accuracy on the {unpruned.n} {data} is {unpruned.value:.4f}, 95 % interval "
        f"[{lo:.4f}, {hi:.4f}]: {width * 100:.1f} points wide, wider than --tolerance {tolerance:g}, so a drop "
        f"within the tolerance cannot be told from chance{more}"
    )


def images_for_width(accuracy: float, width: float, limit: int = 10_000_000) -> int | None:
    """The fewest images whose Wilson interval at ``accuracy`` is at most ``width`` wide (None:
    more than ``limit``): doubling, then bisection."""
    if width <= 0:
        return None

    def narrow(n: int) -> bool:
        lo, hi = wilson(round(accuracy * n), n)
        return hi - lo <= width

    high = 1
    while not narrow(high):
        high *= 2
        if high > limit:
            return None
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if narrow(middle) else (middle, high)
    return high
