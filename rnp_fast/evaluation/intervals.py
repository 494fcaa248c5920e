"""95 % confidence intervals for what a defense reports: a proportion, and a paired difference.

- `wilson`: the Wilson score interval of a proportion (Wilson 1927, "Probable inference, the law
  of succession, and statistical inference", JASA 22:209-212; method 3 of Newcombe 1998a,
  Statistics in Medicine 17:857-872). Accuracies, attack success rates and success rates over
  seeds: it stays inside [0, 1] and is not empty at 0 % or 100 % (the +-SE interval is 0 wide there).
- `paired_difference`: the difference between two proportions measured on the SAME images (clean
  accuracy before and after pruning), Newcombe's method 10 (Newcombe 1998b, "Improved confidence
  intervals for the difference between binomial proportions based on paired data", Statistics in
  Medicine 17:2635-2650): the two marginal Wilson intervals combined, with their correlation
  estimated from the 2x2 table (continuity-corrected as the paper does). Only the discordant
  images (right before and wrong after, or the other way) move the difference; the interval is
  much narrower than treating the two accuracies as independent.

Both are closed forms (no iteration), checked against published worked values in the tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``hits`` out of ``n`` (None when n is 0: nothing measured)."""
    if n <= 0:
        return None
    p = hits / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    scale = 1 + z * z / n
    lower = 0.0 if hits == 0 else max(0.0, (centre - spread) / scale)  # exactly 0 and 1 at the ends,
    upper = 1.0 if hits == n else min(1.0, (centre + spread) / scale)  # where rounding would miss them
    return lower, upper


@dataclass(frozen=True)
class PairedTable:
    """The 2x2 table of one set of images scored twice: ``both`` right before and after,
    ``lost`` right before and wrong after, ``gained`` wrong before and right after, ``neither``."""

    both: int
    lost: int
    gained: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.lost + self.gained + self.neither

    @property
    def difference(self) -> float | None:
        """before - after: the drop (``lost - gained`` images of ``n``)."""
        return (self.lost - self.gained) / self.n if self.n else None


def paired_difference(table: PairedTable, z: float = Z95) -> tuple[float, float] | None:
    """Newcombe's method 10 interval of ``before - after`` for ``table`` (None when it is empty)."""
    n = table.n
    if n == 0:
        return None
    before_hits, after_hits = table.both + table.lost, table.both + table.gained
    p1, p2 = before_hits / n, after_hits / n
    l1, u1 = wilson(before_hits, n, z)
    l2, u2 = wilson(after_hits, n, z)
    phi = correlation(table)
    difference = p1 - p2
    lower = difference - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = difference + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def correlation(table: PairedTable) -> float:
    """The correlation of the two scorings, as Newcombe's method 10 estimates it: the phi
    coefficient with ``ad - bc`` shrunk by n/2 towards 0 when positive (0 within n/2), and 0 when
    any margin is empty."""
    a, b, c, d = table.both, table.lost, table.gained, table.neither
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    if margins == 0:
        return 0.0
    cross = a * d - b * c
    if cross > table.n / 2:
        cross -= table.n / 2
    elif cross >= 0:
        cross = 0
    return cross / math.sqrt(margins)


@dataclass(frozen=True)
class Estimate:
    """A reported figure: its value, the number of images it was measured on and its 95 %
    interval; where it was not measured, value None and the reason."""

    value: float | None
    n: int | None  # None: a figure given without its images (made by hand, not scored)
    ci95: tuple[float, float] | None
    reason: str | None = None  # why value is None

    def fields(self, name: str) -> dict:
        """``name``, ``name_n``, ``name_ci95`` (and ``name_reason`` when not measured), as the
        summaries write them: the value keeps its name, the rest goes beside it."""
        fields = {name: self.value, f"{name}_n": self.n, f"{name}_ci95": list(self.ci95) if self.ci95 else None}
        return {**fields, f"{name}_reason": self.reason} if self.value is None else fields

    def text(self, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
        """``0.9796 [0.9639, 0.9886] of 540 images`` for a log line (``scale`` 100 and ``unit``
        " points": ``3.34 [1.57, 5.35] points of 599 images``)."""
        if self.value is None:
            return f"n/a ({self.reason})"
        if self.ci95 is None:
            return f"{self.value * scale:.{digits}f}{unit}"
        lo, hi = (f"{bound * scale:.{digits}f}" for bound in self.ci95)
        return f"{self.value * scale:.{digits}f} [{lo}, {hi}]{unit} of {self.n} images"
