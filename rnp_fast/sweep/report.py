"""`rnp-fast report STORE`: the sweep's table (Markdown and CSV) and per-attack threshold plots.

Reads only finished jobs, so it can run while the sweep is still going; writes ``STORE/report/``
(or ``--out``) atomically.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

from rnp_fast.errors import UserError
from rnp_fast.outputs import SWEEP_REPORT, RunDirectory, vet_output, writing_inside
from rnp_fast.sweep.curves import plot_attack
from rnp_fast.sweep.store import DATABASE, open_existing
from rnp_fast.sweep.table import group_rows, table_rows, to_csv, to_markdown


def write_report(store_path: str, out: str | None = None) -> dict:
    if out is not None:
        with own_report_folder(store_path, out):  # before reading anything: never replace what we did not make
            vet_output(out, [store_path], kind=SWEEP_REPORT)
    store = open_existing(store_path)
    try:
        rows, counts = store.rows("done"), store.counts()
    finally:
        store.close()
    if not rows:
        raise UserError(f"{store_path}: no finished jobs to report yet ({format_counts(counts)})")
    names, groups = group_rows(rows)
    table = table_rows(names, groups)
    target = Path(out) if out else store.directory / "report"
    plots = []
    with (
        own_report_folder(store.directory, target),
        RunDirectory(target, [store.directory / DATABASE], SWEEP_REPORT) as run,
    ):
        run.write_text("results.md", heading(counts) + to_markdown(names, table))
        run.write_text("results.csv", to_csv(table))
        for attack in sorted({g.settings["attack"] for g in groups}):
            name = f"threshold_{safe_name(attack)}.png"
            attack_groups = [g for g in groups if g.settings["attack"] == attack]
            if plot_attack(run.path(name), attack, attack_groups, store.directory / "jobs"):
                plots.append(str(target / name))
    return {
        "report": str(target),
        "table": str(target / "results.md"),
        "csv": str(target / "results.csv"),
        "plots": plots,
        "rows": len(table),
        "jobs": counts,
    }


def own_report_folder(store: str | Path, target: str | Path):
    """The store's ``report/`` is the one folder inside a store that `report` may write (see outputs)."""
    store = Path(store)
    store = store.parent if store.name == DATABASE else store
    own = Path(target).expanduser().resolve() == (store / "report").resolve()
    return writing_inside(store) if own else contextlib.nullcontext()


def heading(counts: dict) -> str:
    return (
        f"Mean ± standard deviation over seeds ({format_counts(counts)}). Accuracies on the clean test "
        "images of the non-target classes; ASR and RA (robust accuracy) on the triggered ones; a row of one "
        "job also shows its 95 % Wilson interval in brackets (results.csv: every figure's number of images "
        "and interval); times per job in seconds (job: training when the job trained its model, plus the "
        "defense).\n\n"
    )


def format_counts(counts: dict) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no jobs"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text))
