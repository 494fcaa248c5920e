"""The sweep's results table: mean and standard deviation over seeds, one row per configuration.

Each accuracy and ASR also carries its number of test images and, where a row is one job, its 95 %
Wilson interval (from the job's summary); over several seeds the spread over seeds is the figure.

Jobs are grouped by every setting except the seeds, so a row never mixes, say, two RNP alphas.
The columns that name a row are the attack, the architecture, and whichever other settings vary
across the finished jobs.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass

from rnp_fast.config import SECTIONS, not_identity, seed_paths

SEED_KEYS = seed_paths()  # averaged over
NOT_A_SETTING = tuple(f"{section}.{name}" for section in SECTIONS for name in not_identity(section))
ALWAYS_SHOWN = {"attack.attack": "attack", "model.arch": "arch"}
# (column, source column in the store, key, Markdown header)
MEASURES = (
    ("clean_acc_before", "metrics", "clean_acc_before", "clean before"),
    ("clean_acc_after", "metrics", "clean_acc_after", "clean after"),
    ("asr_before", "metrics", "asr_before", "ASR before"),
    ("asr_after", "metrics", "asr_after", "ASR after"),
    ("robust_acc_before", "metrics", "robust_acc_before", None),
    ("robust_acc_after", "metrics", "robust_acc_after", "RA after"),
    ("der", "metrics", "der", "DER"),
    ("pruned", "metrics", "pruned", None),
    ("defense_seconds", "timings", "defense", "defense (s)"),
    ("train_seconds", "timings", "train", None),
    ("job_seconds", "timings", "job", "job (s)"),
)
# The measures that are proportions of test images: n and 95 % interval columns in the CSV.
COUNTED = ("clean_acc_before", "clean_acc_after", "asr_before", "asr_after", "robust_acc_before", "robust_acc_after")


@dataclass
class Group:
    settings: dict  # the naming columns' values
    rows: list[dict]  # store rows of the group's jobs (one per seed)

    def values(self, source: str, key: str) -> list[float]:
        found = (row[source].get(key) for row in self.rows)
        return [float(v) for v in found if v is not None]

    def counted(self, key: str) -> tuple[int | None, list[float] | None]:
        """(images per job, the 95 % interval where the group is one job) of a metric."""
        sizes = {row["metrics"].get(f"{key}_n") for row in self.rows} - {None}
        n = min(sizes) if sizes else None
        interval = self.rows[0]["metrics"].get(f"{key}_ci95") if len(self.rows) == 1 else None
        return n, interval

    def describe(self, skip=("attack",)) -> str:
        shown = [f"{k}={v}" for k, v in self.settings.items() if k not in skip and v != ""]
        return ", ".join(shown) or "all jobs"


def flatten_config(config: dict) -> dict:
    """``{"rnp": {"alpha": 0.2}}`` -> ``{"rnp.alpha": 0.2}`` (values JSON-encoded when not scalar)."""
    flat = {}
    for section, values in config.items():
        for name, value in values.items():
            scalar = value is None or isinstance(value, (str, int, float, bool))
            flat[f"{section}.{name}"] = value if scalar else json.dumps(value, sort_keys=True)
    return flat


def group_rows(rows: list[dict]) -> tuple[list[str], list[Group]]:
    """(naming columns, groups sorted by them) for finished store rows."""
    flats = [flatten_config(row["config"]) for row in rows]
    keys = sorted({key for flat in flats for key in flat} - set(SEED_KEYS) - set(NOT_A_SETTING))
    varying = [k for k in keys if k not in ALWAYS_SHOWN and varies_within_attack_and_arch(k, flats)]
    columns = [*ALWAYS_SHOWN, *varying]
    groups: dict[str, Group] = {}
    for row, flat in zip(rows, flats, strict=True):
        identity = json.dumps([flat.get(k) for k in keys], default=str)
        settings = {ALWAYS_SHOWN.get(k, k): "" if flat.get(k) is None else flat[k] for k in columns}
        groups.setdefault(identity, Group(settings, [])).rows.append(row)
    names = [ALWAYS_SHOWN.get(k, k) for k in columns]
    ordered = sorted(groups.values(), key=lambda g: [sort_key(g.settings[n]) for n in names])
    return names, ordered


def varies_within_attack_and_arch(key: str, flats: list[dict]) -> bool:
    """A setting worth a column: settings that follow from the attack (its label mode, its trigger
    parameters) are constant within an attack and architecture, and would only repeat them."""
    seen: dict[tuple, set] = {}
    for flat in flats:
        seen.setdefault(tuple(flat.get(k) for k in ALWAYS_SHOWN), set()).add(json.dumps(flat.get(key)))
    return any(len(values) > 1 for values in seen.values())


def sort_key(value) -> tuple:
    """Numbers in numeric order (2 before 10), before text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (0, value, "") if number else (1, 0, str(value))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Sample standard deviation over seeds (NaN with fewer than two)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def table_rows(names: list[str], groups: list[Group]) -> list[dict]:
    rows = []
    for group in groups:
        row = {**group.settings, "seeds": len(group.rows)}
        for column, source, key, _ in MEASURES:
            row[f"{column}_mean"], row[f"{column}_std"] = mean_std(group.values(source, key))
        for column in COUNTED:
            n, interval = group.counted(column)
            lo, hi = interval if interval else (None, None)
            row.update({f"{column}_n": n, f"{column}_ci95_lo": lo, f"{column}_ci95_hi": hi})
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    return buffer.getvalue()


def csv_cell(value):
    """Six significant digits; empty for a figure with no value (no "nan" in the file)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def to_markdown(names: list[str], rows: list[dict]) -> str:
    measures = [(column, header) for column, _, _, header in MEASURES if header]
    headers = [*names, "seeds", *(header for _, header in measures)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        cells = [str(row[n]) for n in names] + [str(row["seeds"])]
        for column, _ in measures:
            digits = 1 if column.endswith("seconds") else 3
            cell = plus_minus(row[f"{column}_mean"], row[f"{column}_std"], digits)
            lo, hi = row.get(f"{column}_ci95_lo"), row.get(f"{column}_ci95_hi")
            cells.append(cell if lo is None else f"{cell} [{lo:.{digits}f}, {hi:.{digits}f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plus_minus(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
