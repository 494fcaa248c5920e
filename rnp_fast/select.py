"""Choosing the pruning threshold from clean data only.

A defender has no triggered images, so the rule looks only at clean accuracy on the held-out part
of the defense data: walk the schedule from the smallest threshold up and keep going while the
pruned model's held-out accuracy stays within ``tolerance`` of the unpruned model's; the last step
that passed is chosen (the largest threshold of the passing prefix). Larger thresholds prune more
channels, so this prunes as much as clean accuracy allows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Choice:
    index: int | None  # index into the schedule, None = prune nothing
    rule: str
    warning: str | None = None  # the rule ran on images too few to resolve its tolerance (rule_power)


def choose_step(
    holdout_accs: list[float],
    base_acc: float,
    tolerance: float,
    labels: list[float],
    data: str = "held-out images",
    images: int | None = None,
) -> Choice:
    floor = base_acc - tolerance
    chosen = None
    for index, acc in enumerate(holdout_accs):
        if acc < floor - 1e-12:
            break
        chosen = index
    rule = (
        f"largest threshold of the schedule's prefix whose clean accuracy on the {data} stays >= unpruned "
        f"({base_acc:.4f}{'' if images is None else f' on {images} images'}) - tolerance ({tolerance:.4f})"
    )
    if chosen is None:
        return Choice(
            None,
            rule + f"; none passed (first step {labels[0]!r} scored {holdout_accs[0]:.4f}), nothing pruned",
        )
    return Choice(chosen, rule + f": {labels[chosen]!r} (accuracy {holdout_accs[chosen]:.4f})")
