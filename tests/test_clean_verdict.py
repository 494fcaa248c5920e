"""The clean-verdict study (benchmarks/clean_verdict_study.py): its discrimination figures against
hand-computed values, its plan, its report on made-up records, and (heavy) its dry run end to end."""

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def study():
    """The script as a module (its folder on sys.path for this module only); it sets no state on import."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        yield importlib.import_module("clean_verdict_study")
    torch.set_num_threads(threads)


def test_auc_counts_pairs_won_and_ties_as_half(study):
    # pairs (p > n): 0.9 beats both, 0.8 beats both, 0.4 beats 0.3 only: 5 of 6
    assert study.roc_auc([0.9, 0.8, 0.4], [0.5, 0.3]) == pytest.approx(5 / 6)
    assert study.roc_auc([1.0, 2.0], [1.0]) == 0.75  # one tie (0.5) and one win, over 2 pairs
    assert study.roc_auc([0.1], [0.9]) == 0.0
    assert math.isnan(study.roc_auc([], [1.0]))


def test_tpr_at_fpr_takes_the_best_threshold_that_flags_at_most_a_tenth_of_the_negatives(study):
    positives = [0.9, 0.8, 0.4]
    negatives = [0.85, 0.5, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01]
    # score >= 0.8 flags 0.9, 0.8 and one negative (0.85): FPR 0.1, TPR 2/3; >= 0.4 would flag two negatives
    assert study.tpr_at_fpr(positives, negatives) == pytest.approx(2 / 3)
    assert study.tpr_at_fpr(positives, negatives, max_fpr=0.0) == pytest.approx(1 / 3)  # >= 0.9 only
    assert study.tpr_at_fpr([1.0], [1.0]) == 0.0  # any threshold that flags it flags the negative too


def test_bootstrap_interval_of_the_auc(study):
    assert study.bootstrap_auc([2.0, 3.0], [0.0, 1.0], draws=200) == [1.0, 1.0]  # always separated
    assert study.bootstrap_auc([1.0, 1.0], [1.0, 1.0], draws=200) == [0.5, 0.5]  # always tied
    positives, negatives = [0.9, 0.8, 0.4, 0.6, 0.35], [0.5, 0.3, 0.45, 0.1, 0.7]
    low, high = study.bootstrap_auc(positives, negatives, draws=500)
    assert 0 <= low < study.roc_auc(positives, negatives) < high <= 1
    assert study.bootstrap_auc(positives, negatives, draws=500) == [low, high]  # seeded: reproducible


def test_the_ship_rule_needs_a_high_auc_a_high_lower_end_and_ten_models_a_side(study):
    good = {"auc": 0.95, "auc_95": [0.85, 1.0], "n": [10, 12]}
    assert study.passes(good)
    assert not study.passes({**good, "auc_95": [0.75, 1.0]})
    assert not study.passes({**good, "auc": 0.89})
    assert not study.passes({**good, "n": [9, 12]})  # a perfect split of a few proves little
    assert not study.passes({"auc": None})


def test_the_statistics_helpers_on_hand_computed_values(study):
    top, share, entropy = study.share_and_entropy([2, 2, 0])
    assert (top, share) == (0, 0.5) and entropy == pytest.approx(math.log(2))
    # others [1, 2, 3, 4]: median 2.5, absolute deviations [1.5, 0.5, 0.5, 1.5]: MAD 1.0
    assert study.anomaly_index([1, 2, 3, 4, 10]) == pytest.approx(7.5 / 1.4826)
    flat = study.mmbd_score([10.0, 11.0, 9.5, 10.5, 10.2, 9.8, 10.1, 9.9, 10.3, 10.4])
    spike = study.mmbd_score([10.0, 11.0, 9.5, 10.5, 10.2, 9.8, 10.1, 9.9, 10.3, 60.0])
    assert 0 <= flat < 2 < spike  # -log10 p: a margin far above the others is improbable under the null
    assert math.isfinite(study.mmbd_score([-3.0, 1.0, 2.0, 1.5, 0.5, 2.5, 1.2, 0.8, 1.1, 20.0]))  # a margin < 0 too


def test_the_plan_has_ten_or_more_models_a_group_and_varied_targets(study):
    specs = study.study_models()
    clean = [s for s in specs if s.group == "clean"]
    backdoored = [s for s in specs if s.group == "backdoored"]
    assert len(clean) >= 10 and len(backdoored) >= 10 and len({s.name for s in specs}) == len(specs)
    assert {s.attack for s in backdoored} == {"badnets", "blend", "wanet"} and {s.width for s in specs} == {0.25, 0.125}
    assert len({s.target for s in backdoored}) >= 8  # no class is the backdoors' own
    halves = study.shard(specs, study.shard_flag("0/2")), study.shard(specs, study.shard_flag("1/2"))
    for bad in ("2", "2/2", "a/b", "0/0"):
        with pytest.raises(argparse.ArgumentTypeError):
            study.shard_flag(bad)
    assert sorted(s.name for half in halves for s in half) == sorted(s.name for s in specs)
    assert all({s.group for s in half} == {"clean", "backdoored"} for half in halves)
    job = backdoored[0].job()
    assert job.attack.poison and job.attack.target == backdoored[0].target and not clean[0].job().attack.poison


def made_up_record(name: str, group: str, collapse: int, share: float, margins: list[float], purified=()) -> dict:
    counts = [0] * 10
    counts[collapse] = round(100 * share)
    counts[(collapse + 1) % 10] = 100 - counts[collapse]
    trace = {
        "seed": 0,
        "stop_epoch": 1,
        "counts": counts,
        "epochs": [{"epoch": 0, "loss": 3.0, "acc": 0.5, "counts": counts}],
    }
    return {
        "name": name,
        "group": group,
        "attack": None if group == "clean" else "badnets",
        "width": 0.25,
        "seed": 0,
        "target": None if group == "clean" else 3,
        "clean_acc": 0.99,
        "asr": 0.0 if group == "clean" else 1.0,
        "unlearning": [trace, {**trace, "seed": 1}],
        "max_margins": margins,
        "second_choice_counts": [5] * 10,
        "mean_prob_others": [0.01] * 10,
        "purified": list(purified),
        "seconds": 1.0,
        "load_average": [1.0, 1.0, 1.0],
    }


def test_the_report_groups_the_records_and_scores_each_question(study, tmp_path):
    flat = [10.0 + 0.1 * c for c in range(10)]
    spiked = flat[:3] + [50.0] + flat[4:]
    records = [made_up_record(f"clean-{i}", "clean", i, 0.5, flat) for i in range(3)]
    for i in range(3):
        kept = {**made_up_record("p", "backdoored", 3, 1.0, spiked), "defense_seed": 0, "asr_after": 0.9, "pruned": 0}
        gone = {**made_up_record("p", "backdoored", 5, 0.4, flat), "defense_seed": 1, "asr_after": 0.05, "pruned": 7}
        children = [{**kept, "name": f"bad-{i}-d0"}, {**gone, "name": f"bad-{i}-d1"}]
        records.append(made_up_record(f"bad-{i}", "backdoored", 3, 1.0, spiked, children))
    (tmp_path / "records0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "result.json"
    result = study.report(tmp_path, str(out), study.STUDY)
    saved = json.loads(out.read_text())
    assert saved["groups"]["clean"]["n"] == 3 and saved["groups"]["backdoored"]["n"] == 3
    assert (saved["groups"]["purified"]["removed"], saved["groups"]["purified"]["still_backdoored"]) == (3, 3)
    first = saved["questions"]["backdoored_vs_clean"]
    assert first["top_share"]["auc"] == 1.0 and first["mmbd"]["auc"] == 1.0 and first["mmbd"]["n"] == [3, 3]
    second = saved["questions"]["purified_still_backdoored_vs_removed"]
    assert second["same_collapse_as_original"]["auc"] == 1.0
    assert saved["groups"]["purified"]["nothing_pruned"] == 3  # the kept ones: the backdoored model itself
    assert saved["questions"]["purified_pruned_still_backdoored_vs_removed"]["top_share"]["auc"] is None
    assert saved["target_agreement"]["backdoored"]["collapse_class_is_target"] == 1.0
    assert saved["target_agreement"]["purified_removed"]["collapse_class_is_target"] == 0.0
    assert saved["shipped"] is False and result["shipped"] is False  # perfect, but 3 models a side
    assert saved["machine"]["idle"] is False and saved["device"] == "cpu" and saved["versions"]["torch"]


@pytest.mark.heavy  # trains two 1-epoch models, unlearns, defends and reports: ~20 s of CPU
def test_the_dry_run_trains_measures_and_reports(tmp_path):
    out = tmp_path / "result.json"
    command = [sys.executable, str(BENCHMARKS / "clean_verdict_study.py"), "dry-run", "--work", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "trained" in result.stdout  # the first run trains: the resumed run below must not
    saved = json.loads(out.read_text())
    assert saved["groups"]["clean"]["n"] == 1 and saved["groups"]["backdoored"]["n"] == 1
    assert saved["groups"]["purified"]["n"] == 1
    assert saved["questions"]["backdoored_vs_clean"]["top_share"]["n"] == [1, 1]
    again = subprocess.run([*command], capture_output=True, text=True, timeout=120, env=env)
    assert again.returncode == 0 and "trained" not in again.stdout  # resumed: nothing trained twice


def test_the_log_s_figure_for_the_collapse_class_is_the_saved_study_s():
    from rnp_fast.diagnostics import COLLAPSE_CLASS_WORTH

    saved = json.loads((BENCHMARKS / "results" / "clean_verdict_digits_cpu.json").read_text())
    backdoored = saved["groups"]["backdoored"]
    hits = round(saved["target_agreement"]["backdoored"]["collapse_class_is_target"] * backdoored["n"])
    assert f"target for {hits} of {backdoored['n']} backdoored models" in COLLAPSE_CLASS_WORTH
    assert saved["shipped"] is False and saved["groups"]["clean"]["n"] >= 10 and backdoored["n"] >= 10
