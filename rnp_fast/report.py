"""Reference-format files and our own reports.

- ``mask_values.txt``: ``No \\t Layer Name \\t Neuron Idx \\t Mask Score`` then one row per channel;
- ``pruning_by_threshold.txt`` / ``pruning_by_number.txt``: one row per evaluated step;
- ``pruning.csv`` (every metric per step), ``pruning.png`` (clean accuracy and ASR vs threshold).

The text formats follow the reference byte for byte where its logs show them, so results can be
compared line by line.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.evaluation.intervals import Estimate
from rnp_fast.evaluation.metrics import FIGURES, PROPORTIONS, Metrics
from rnp_fast.evaluation.scoring import HoldoutScores
from rnp_fast.prune import Channel, PruneStep

MASK_HEADER = "No \t Layer Name \t Neuron Idx \t Mask Score \n"
PRUNING_HEADER = "No \t Layer Name \t Neuron Idx \t Mask \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC\n"
EPOCH_HEADER = "Epoch \t lr \t Time \t TrainLoss \t TrainACC \t PoisonLoss \t PoisonACC \t CleanLoss \t CleanACC"


def format_mask_values(channels: list[Channel]) -> str:
    rows = [f"{i} \t {c.layer} \t {c.index} \t {c.value:.4f} \n" for i, c in enumerate(channels)]
    return MASK_HEADER + "".join(rows)


def parse_mask_values(text: str, source: str = "mask file", sizes: dict[str, int] | None = None) -> list[Channel]:
    """Read a mask file the reference's way (whitespace-separated columns under one header row),
    strictly: exactly four columns per row, an integer row number and channel index, and a finite
    mask value in [0, 1] (what recovering produces). With ``sizes`` (BatchNorm layer name ->
    channel count of the model) every channel must be listed exactly once. The first offending
    line is named."""
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise UserError(f"{source} is empty")
    header_number, header = lines[0]
    if header.split()[:1] != ["No"]:
        raise UserError(f"{source}, line {header_number}: expected the header 'No  Layer Name  Neuron Idx  Mask Score'")
    channels, seen = [], set()
    for number, line in lines[1:]:
        channel = parse_mask_row(line, f"{source}, line {number}")
        if sizes is not None:
            check_channel_fits(channel, sizes, seen, f"{source}, line {number}")
        channels.append(channel)
    if not channels:
        raise UserError(f"{source} has a header but no channels")
    if sizes is not None:
        check_every_channel_listed(seen, sizes, source)
    return channels


def parse_mask_row(line: str, where: str) -> Channel:
    fields = line.split()
    if len(fields) != 4:
        raise UserError(f"{where}: expected 4 columns 'No Layer Idx Score', got {len(fields)}: {line.strip()!r}")
    try:
        int(fields[0])
        channel = Channel(fields[1], int(fields[2]), float(fields[3]))
    except ValueError:
        raise UserError(
            f"{where}: expected 'No Layer Idx Score' (whole numbers, a mask value), got {line.strip()!r}"
        ) from None
    check_mask_value(channel.value, where, fields[3])
    return channel


def check_mask_value(value: float, where: str, text: str | None = None) -> None:
    """A mask value is a finite number in [0, 1], what recovering produces (``text``: as written)."""
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise UserError(f"{where}: mask value {text if text is not None else value} is not a number in [0, 1]")


def check_channel_fits(channel: Channel, sizes: dict[str, int], seen: set, where: str) -> None:
    key = (channel.layer, channel.index)
    if channel.layer not in sizes or not 0 <= channel.index < sizes[channel.layer]:
        raise UserError(f"{where}: channel {channel.layer}[{channel.index}] does not exist in this model")
    if key in seen:
        raise UserError(f"{where}: channel {channel.layer}[{channel.index}] is listed twice")
    seen.add(key)


def check_every_channel_listed(seen: set, sizes: dict[str, int], source: str, holder: str = "a mask file") -> None:
    total = sum(sizes.values())
    if len(seen) != total:
        layer, index = next((name, i) for name, count in sizes.items() for i in range(count) if (name, i) not in seen)
        raise UserError(
            f"{source} lists {len(seen)} of the model's {total} BatchNorm channels (first missing: "
            f"{layer}[{index}]); {holder} must list every channel once"
        )


def read_mask_file(path: str | Path, sizes: dict[str, int] | None = None) -> list[Channel]:
    """The channels of a mask file, checked against the model's BatchNorm ``sizes`` when given."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"--mask-file {path} is a directory; give a mask_values.txt file")
    if not path.is_file():
        raise UserError(f"mask file not found: {path}")
    return parse_mask_values(path.read_text(encoding="utf-8", errors="replace"), str(path), sizes)


def pruning_row(step: PruneStep, metrics: Metrics, by: str) -> str:
    # By threshold the reference names the first channel left unpruned, prints the count with two
    # decimals and its raw float threshold (i * step); by number we name the last channel pruned
    # and its mask.
    named = step.boundary if by == "threshold" else step.last
    layer, index = (named.layer, named.index) if named else ("None", "None")
    count = f"{step.count:.2f}" if by == "threshold" else f"{step.count}"
    threshold = step.label if step.reference_label is None else step.reference_label
    label = repr(threshold) if by == "threshold" else f"{named.value:.4f}" if named else "None"
    return (
        f"{count} \t {layer} \t {index} \t {label} \t {metrics.poison_loss:.4f} \t {metrics.asr:.4f}"
        f" \t {metrics.clean_loss:.4f} \t {metrics.clean_acc:.4f}\n"
    )


def format_pruning_table(steps: list[PruneStep], metrics: list[Metrics], by: str) -> str:
    return PRUNING_HEADER + "".join(pruning_row(s, m, by) for s, m in zip(steps, metrics, strict=True))


def format_pruning_csv(
    steps: list[PruneStep],
    metrics: list[Metrics],
    holdout: HoldoutScores,
    per_class: list[list[float]] | None = None,
) -> str:
    """One row per step: every metric, the held-out accuracy, and (at the end, so the columns
    before keep their places) each proportion's number of images and 95 % interval
    (``asr_n``, ``asr_ci95_lo``, ``asr_ci95_hi``, ...; `Metrics.estimate`). ``per_class`` (per step,
    the held-out accuracy of every class: see `diagnostics`) adds the columns
    ``holdout_acc_class_0``, ... so a user sees which class a threshold hurts."""
    buffer = io.StringIO()
    names = list(FIGURES)
    classes = len(per_class[0]) if per_class else 0
    writer = csv.writer(buffer, lineterminator="\n")
    class_columns = [f"holdout_acc_class_{c}" for c in range(classes)]
    counted = [*PROPORTIONS, "holdout_acc"]
    interval_columns = [f"{name}_{part}" for name in counted for part in ("n", "ci95_lo", "ci95_hi")]
    writer.writerow(["step", "label", "pruned", *names, "holdout_acc", *class_columns, *interval_columns])
    rows = per_class or [[] for _ in steps]
    for number, (step, metric, by_class) in enumerate(zip(steps, metrics, rows, strict=True)):
        values = metric.as_dict()
        estimates = [*(metric.estimate(name) for name in PROPORTIONS), holdout.estimate(number)]
        cells = [
            *(decimal_cell(values[n]) for n in names),
            decimal_cell(holdout.per_step[number]),
            *(decimal_cell(a) for a in by_class),
            *(cell for estimate in estimates for cell in interval_cells(estimate)),
        ]
        writer.writerow([number, step.label, step.count, *cells])
    return buffer.getvalue()


def decimal_cell(value: float) -> str:
    """Six decimals; empty where nothing was measured (no "nan" for a spreadsheet to trip on)."""
    return f"{value:.6f}" if math.isfinite(value) else ""


def interval_cells(estimate: Estimate) -> list:
    if estimate.ci95 is None:
        return [estimate.n, "", ""]
    return [estimate.n, f"{estimate.ci95[0]:.6f}", f"{estimate.ci95[1]:.6f}"]


def epoch_row(epoch: int, lr: float, seconds: float, loss: float, acc: float, metrics: Metrics | None) -> str:
    """A row of the reference's per-epoch table ('-' where no evaluation ran that epoch)."""
    evaluated = (
        f"{metrics.poison_loss:.4f} \t {metrics.asr:.4f} \t {metrics.clean_loss:.4f} \t {metrics.clean_acc:.4f}"
        if metrics
        else "- \t - \t - \t -"
    )
    return f"{epoch} \t {lr:.3f} \t {seconds:.1f} \t {loss:.4f} \t {acc:.4f} \t {evaluated}"


def plot_pruning(path: Path, steps: list[PruneStep], metrics: list[Metrics], by: str, chosen: int | None) -> None:
    """Clean accuracy and ASR against the threshold (or count), the chosen step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [step.label for step in steps]
    figure, axes = plt.subplots(figsize=(6, 4), dpi=120)
    axes.plot(xs, [m.clean_acc for m in metrics], "o-", label="clean accuracy (non-target)")
    axes.plot(xs, [m.asr for m in metrics], "s-", label="attack success rate")
    axes.plot(xs, [m.robust_acc for m in metrics], "^--", label="robust accuracy", alpha=0.6)
    if chosen is not None:
        axes.axvline(xs[chosen], color="gray", linestyle=":", label=f"chosen ({xs[chosen]:.3g})")
    axes.set_xlabel("pruning threshold" if by == "threshold" else "channels pruned")
    axes.set_ylabel("rate")
    axes.set_ylim(-0.02, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(loc="center left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
