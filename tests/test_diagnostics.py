"""Target-class diagnostics: the predicted-class histogram and per-class accuracy per candidate."""

import json
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from rnp_fast.diagnostics import COLLAPSE_CLASS_WORTH, ClassHistogram, TargetReport, predicted_class_histogram
from rnp_fast.evaluation.metrics import per_class_accuracy
from rnp_fast.evaluation.scoring import ScoringOptions, holdout_accuracies
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.models import build_model
from rnp_fast.outputs import json_text
from rnp_fast.prune import Channel, PruneStep

TINY_RNP = dict(unlearning_epochs=1, recovering_epochs=2, pruning_step=0.3, allow_small_holdout=True)


def tiny_job(model, out):
    from test_pipeline import job

    return job(model, out, rnp=TINY_RNP)


class Constant(nn.Module):
    """Predicts class ``target`` for every image (an unlearned model collapsed onto its target)."""

    def __init__(self, target: int, classes: int = 10):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(classes))
        with torch.no_grad():
            self.bias[target] = 5.0

    def forward(self, x):
        return self.bias.expand(len(x), -1)


def images(count: int, classes: int = 10) -> ImageSet:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (count, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return ImageSet(pixels, torch.arange(count) % classes)


def test_a_collapsed_model_names_its_class():
    histogram = predicted_class_histogram(Constant(7), images(30), (0.5,) * 3, (0.25,) * 3, 10)
    assert histogram.counts == [0] * 7 + [30] + [0] * 2
    assert histogram.top_class == 7 and histogram.top_share == 1.0
    assert "class 7 takes 100%, the class unlearning collapses onto" in histogram.describe()
    assert "suspected" not in histogram.describe()  # a collapse is not a verdict (docs/efficacy.md)
    saved = histogram.as_dict()
    assert saved["collapse_class"] == 7 and saved["collapse_class_share"] == 1.0
    assert saved["collapse_class_worth"] == COLLAPSE_CLASS_WORTH


def test_a_histogram_of_no_images_names_no_class_and_stays_strict_json():
    report = TargetReport(ClassHistogram([0, 0, 0]), [math.nan] * 3, [[math.nan] * 3], [0, 0, 0])
    saved = json.loads(json_text(report.as_dict([0.0])))
    assert saved["unlearned_prediction_histogram"] == {
        "counts": [0, 0, 0],
        "collapse_class": None,
        "collapse_class_share": None,
        "collapse_class_worth": COLLAPSE_CLASS_WORTH,
    }
    assert saved["holdout_acc_per_class_unpruned"] == [None] * 3


def test_histogram_ties_go_to_the_lowest_class():
    assert ClassHistogram([3, 5, 5]).top_class == 1


def test_per_class_accuracy_counts_within_each_true_class():
    logits = torch.eye(3)[[0, 0, 1, 2, 2]]  # predictions 0 0 1 2 2
    labels = torch.tensor([0, 1, 1, 2, 0])
    accuracies = per_class_accuracy(logits, labels, 4)
    assert accuracies[:3] == [0.5, 0.5, 1.0]
    assert accuracies[3] != accuracies[3]  # NaN: no image of class 3


def test_per_class_accuracies_per_step_agree_batched_and_sequential():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 0.125).eval()
    data = images(20)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    steps = [PruneStep(0.1, 0, []), PruneStep(0.5, 8, [Channel(names[-1], i, 0.0) for i in range(8)])]
    stats = ((0.5,) * 3, (0.25,) * 3)
    batched = holdout_accuracies(model, steps, data, *stats, ScoringOptions(scoring="batched"), 10)
    sequential = holdout_accuracies(model, steps, data, *stats, ScoringOptions(scoring="sequential"), 10)
    assert repr(batched) == repr(sequential)  # exact; repr because NaN (a class with no image) != NaN
    per_step = batched.per_step_per_class
    assert per_step[0] == batched.base_per_class  # nothing pruned: the unpruned model's figures
    assert len(per_step) == 2 and all(len(row) == 10 for row in per_step)


def test_a_defense_s_per_class_accuracies_add_up_to_its_rule_s_accuracies(tiny_checkpoint, tmp_path):
    import json
    import math

    from rnp_fast.defense import compute_defense, load_inputs
    from rnp_fast.diagnostics import target_report, write_diagnostics
    from rnp_fast.outputs import RunDirectory
    from rnp_fast.resolved import resolve_run

    job = replace(tiny_job(tiny_checkpoint, None), out=None)
    run = resolve_run(job.model, job.data, job.attack, job.engine)
    inputs = load_inputs(job, run)
    defense = compute_defense(job, run, inputs)
    report = target_report(defense)
    labels = defense.loaded.data.rule_images.labels
    counts = torch.bincount(labels, minlength=10).tolist()
    assert report.histogram.total == len(labels)
    assert len(report.per_step) == len(defense.pruning.steps)
    for overall, per_class in zip(defense.pruning.holdout.per_step, report.per_step, strict=True):
        weighted = sum(a * n for a, n in zip(per_class, counts, strict=True) if not math.isnan(a)) / len(labels)
        assert weighted == pytest.approx(overall, abs=1e-6)
    with RunDirectory(tmp_path / "run") as out:
        write_diagnostics(out, report, defense.pruning.steps, defense.pruning.choice.index, "threshold")
    saved = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert saved["unlearned_prediction_histogram"]["counts"] == report.histogram.counts
    assert (tmp_path / "run" / "per_class.png").stat().st_size > 0


def test_a_defense_run_saves_its_diagnostics(tiny_checkpoint, tmp_path):
    import csv
    import json

    from rnp_fast.defense import run_defense

    out = tmp_path / "run"
    run_defense(tiny_job(tiny_checkpoint, out))
    rows = list(csv.DictReader((out / "pruning.csv").open()))
    assert len(rows) == 4 and all(f"holdout_acc_class_{c}" in rows[0] for c in range(10))
    saved = json.loads((out / "diagnostics.json").read_text())
    assert len(saved["holdout_acc_per_class"]) == 4
    assert sum(saved["unlearned_prediction_histogram"]["counts"]) > 0
    assert (out / "per_class.png").is_file()
    log = (out / "output.log").read_text()
    assert "the class unlearning collapses onto" in log and "suspected" not in log
