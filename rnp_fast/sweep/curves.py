"""Plots of a sweep: ASR and clean accuracy against the pruning threshold, one figure per attack.

Each line is one group of the results table (a configuration), its mean over seeds with a band of
one standard deviation, read from the jobs' ``pruning.csv`` files.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from rnp_fast.sweep.table import Group

PANELS = (("asr", "attack success rate"), ("clean_acc", "clean accuracy (non-target)"))


def read_pruning_csv(path: Path) -> dict[float, dict[str, float]]:
    """{threshold (or channel count): {metric: value}} from a job's pruning.csv."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {float(row["label"]): {k: float(row[k]) for k, _ in PANELS} for row in csv.DictReader(handle)}


def group_curve(group: Group, jobs_dir: Path) -> tuple[list[float], dict[str, tuple[list, list]]] | None:
    """(x values, {metric: (means, stds)}) over the group's jobs; None if no job has its table.
    Only thresholds every job evaluated are kept, so each point averages the same seeds."""
    paths = [jobs_dir / row["hash"] / "pruning.csv" for row in group.rows]
    tables = [read_pruning_csv(path) for path in paths if path.is_file()]
    if not tables:
        return None
    xs = sorted(set.intersection(*(set(t) for t in tables)))
    curves = {}
    for metric, _ in PANELS:
        samples = [[t[x][metric] for t in tables] for x in xs]
        stds = [statistics.stdev(s) if len(s) > 1 else 0.0 for s in samples]
        curves[metric] = ([statistics.fmean(s) for s in samples], stds)
    return xs, curves


def plot_attack(path: Path, attack: str, groups: list[Group], jobs_dir: Path) -> bool:
    """Write one attack's figure; False when none of its jobs has a pruning table."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and workers
    import matplotlib.pyplot as plt

    curves = [(group, group_curve(group, jobs_dir)) for group in groups]
    curves = [(group, curve) for group, curve in curves if curve is not None]
    if not curves:
        return False
    by_number = {g.rows[0]["config"]["rnp"]["pruning_by"] for g, _ in curves} == {"number"}
    figure, axes = plt.subplots(1, len(PANELS), figsize=(11, 4), dpi=120, sharex=True)
    for axis, (metric, title) in zip(axes, PANELS, strict=True):
        for group, (xs, values) in curves:
            means, stds = values[metric]
            line = axis.plot(xs, means, "o-", markersize=3, label=f"{group.describe()} (n={len(group.rows)})")[0]
            low = [m - s for m, s in zip(means, stds, strict=True)]
            high = [m + s for m, s in zip(means, stds, strict=True)]
            axis.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
        axis.set_title(f"{attack}: {title}")
        axis.set_xlabel("channels pruned" if by_number else "pruning threshold")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True
