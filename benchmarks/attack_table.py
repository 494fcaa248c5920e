"""The README's attack table, checked against issue 3's targets, from two finished sweeps.

    rnp-fast sweep benchmarks/digits_attacks.yaml --store runs/attacks
    rnp-fast sweep benchmarks/digits_clean_baseline.yaml --store runs/clean
    python benchmarks/attack_table.py runs/attacks runs/clean --out benchmarks/results/digits_attacks_cpu.json

Per attack: clean accuracy (the whole clean test set) and ASR of the backdoored model, the same
after `defend` (its held-out threshold rule), and the clean model trained the same way (the
baseline sweep: `attack.poison: false`). Targets: ASR >= 0.90 (clean-label attacks >= 0.80) and
clean accuracy within 0.03 of the baseline. Prints the Markdown rows; writes the JSON evidence.
"""

from __future__ import annotations

from rnp_fast import harness
from rnp_fast.attacks import CLEAN_LABEL_ATTACKS
from rnp_fast.errors import UserError
from rnp_fast.sweep.store import open_existing

ASR_TARGET = {"all2one": 0.90, "clean-label": 0.80}
CLEAN_TOLERANCE = 0.03


def finished_rows(store: str) -> list[dict]:
    results = open_existing(store)
    try:
        rows = results.rows("done")
    finally:
        results.close()
    if not rows:
        raise UserError(f"{store}: no finished jobs")
    return rows


def baseline_clean_accuracy(rows: list[dict], store: str) -> float:
    """Mean clean accuracy of the baseline store's models, which must all be trained unpoisoned."""
    poisoned = [row["config"]["attack"]["attack"] for row in rows if row["config"]["attack"].get("poison", True)]
    if poisoned:
        raise UserError(f"{store}: not a clean baseline (jobs with poisoning: {', '.join(poisoned)})")
    return sum(row["metrics"]["model_clean_acc"] for row in rows) / len(rows)


def attack_entry(row: dict, baseline: float) -> dict:
    attack, metrics = row["config"]["attack"], row["metrics"]
    clean_label = attack["attack"] in CLEAN_LABEL_ATTACKS
    asr_target = ASR_TARGET["clean-label" if clean_label else "all2one"]
    clean_before = metrics["clean_acc_full_before"]
    return {
        "attack": attack["attack"],
        "label_mode": attack["label_mode"],
        "attack_param": attack["attack_param"],
        "clean_before": clean_before,
        "asr_before": metrics["asr_before"],
        "clean_after": metrics["clean_acc_full_after"],
        "asr_after": metrics["asr_after"],
        "threshold": metrics["threshold"],
        "pruned": metrics["pruned"],
        "clean_drop_vs_baseline": baseline - clean_before,
        "asr_target": asr_target,
        "meets_asr_target": metrics["asr_before"] >= asr_target,
        "meets_clean_target": baseline - clean_before <= CLEAN_TOLERANCE,
        "train_seconds": row["timings"]["train"],
        "defense_seconds": row["timings"]["defense"],
    }


def markdown(entries: list[dict], baseline: float) -> str:
    lines = [
        f"clean model trained the same way: clean accuracy {baseline:.3f}",
        "| attack | clean / ASR before | after `defend` (threshold) | targets met |",
        "|---|---|---|---|",
    ]
    for e in entries:
        met = "yes" if e["meets_asr_target"] and e["meets_clean_target"] else "no"
        threshold = "none" if e["threshold"] is None else f"{e['threshold']:.2f}"
        lines.append(
            f"| {e['attack']} | {e['clean_before']:.3f} / {e['asr_before']:.3f} | "
            f"{e['clean_after']:.3f} / {e['asr_after']:.3f} ({threshold}) | {met} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("attacks", help="store of the attack sweep (digits_attacks.yaml)")
    parser.add_argument("baseline", help="store of the clean-baseline sweep (digits_clean_baseline.yaml)")
    args = parser.parse_args()
    baseline = baseline_clean_accuracy(finished_rows(args.baseline), args.baseline)
    rows = finished_rows(args.attacks)
    entries = sorted((attack_entry(row, baseline) for row in rows), key=lambda e: e["attack"])
    print(markdown(entries, baseline))
    result = {
        "setup": {name: part for name, part in rows[0]["config"].items() if name != "attack"},
        "baseline_clean_acc": baseline,
        "clean_tolerance": CLEAN_TOLERANCE,
        "attacks": entries,
        "all_targets_met": all(e["meets_asr_target"] and e["meets_clean_target"] for e in entries),
    }
    harness.write_result(result, args.out)  # the table is computed on the CPU, from the stores


if __name__ == "__main__":
    harness.run(main)
