"""The threshold rule refuses to choose on fewer images than its tolerance can resolve: through the
CLI (before torch is imported), the Python API and a sweep file; the opt-in; the exact bound."""

from __future__ import annotations

import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from tests_support import TINY_WIDTH, benchmark_module, strict_json_files

import rnp_fast
from rnp_fast.cli import build_parser, config_from_args
from rnp_fast.config import DataConfig, RNPConfig
from rnp_fast.errors import UserError
from rnp_fast.evaluation.intervals import Estimate, wilson
from rnp_fast.loaders.sources import digits_source
from rnp_fast.models import build_model
from rnp_fast.rule_power import (
    KNOWN_TRAIN_IMAGES,
    check_known_dataset,
    check_rule_images,
    defense_sizes,
    images_needed,
    rule_warning,
)
from rnp_fast.sweep.spec import load_sweep

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "rnp_fast" / "assets" / "demo_badnets_digits_resnet18w025.safetensors"


def test_images_needed_is_exact_for_tolerances_as_written():
    assert [images_needed(t) for t in (0.02, 0.03, 0.1, 0.5, 1.0)] == [50, 34, 10, 2, 1]
    assert images_needed(0.0) is None
    for thousandths in range(1, 1001):
        tolerance = thousandths / 1000
        needed = images_needed(tolerance)
        exact = Fraction(thousandths, 1000)
        assert needed * exact >= 1 > (needed - 1) * exact, tolerance


def test_the_references_cifar10_defaults_sit_exactly_on_the_bound_and_run():
    """500 defense images (--ratio 0.01 of 50,000), 10 % held out: 50 images, never refused at 0.02."""
    reference = DataConfig(dataset="cifar10", ratio=0.01, holdout=0.1)
    assert defense_sizes(KNOWN_TRAIN_IMAGES["cifar10"], reference.ratio, reference.holdout) == (500, 50)
    check_rule_images(50_000, reference, RNPConfig())
    check_known_dataset(reference, RNPConfig())
    check_known_dataset(DataConfig(dataset="synthetic-cifar10", ratio=0.01), RNPConfig())
    check_rule_images(500, DataConfig(ratio=1.0, holdout=0.1), RNPConfig(tolerance=0.02))
    with pytest.raises(UserError, match="49 held-out images"):
        check_rule_images(490, DataConfig(ratio=1.0, holdout=0.1), RNPConfig(tolerance=0.02))


def test_the_refusal_names_the_size_needed_and_the_flags_that_give_it():
    with pytest.raises(UserError) as refused:
        check_known_dataset(DataConfig(dataset="digits"), RNPConfig())
    message = str(refused.value)
    assert "1 held-out image (--holdout 0.1 of 12 defense images, --ratio 0.01 of 1,198" in message
    assert "at least 50" in message and "--ratio" in message and "--holdout 0.42" not in message
    assert "--threshold" in message and "--allow-small-holdout" in message and "\n" not in message
    with pytest.raises(UserError, match="the 240 training images .*none held out"):  # --holdout 0: training images
        check_known_dataset(DataConfig(dataset="digits", ratio=0.2, holdout=0.0), RNPConfig(tolerance=0.001))
    with pytest.raises(UserError, match="--tolerance 0 cannot be resolved"):
        check_known_dataset(DataConfig(dataset="digits", ratio=0.3, holdout=0.3), RNPConfig(tolerance=0.0))


def test_a_fixed_threshold_or_the_opt_in_needs_no_hold_out():
    check_known_dataset(DataConfig(dataset="digits"), RNPConfig(threshold=0.2))
    check_known_dataset(DataConfig(dataset="digits"), RNPConfig(allow_small_holdout=True))
    check_known_dataset(DataConfig(dataset="digits", ratio=0.3, holdout=0.3), RNPConfig())  # the demo's 108


def test_the_cli_flag_opts_in():
    args = build_parser().parse_args(["defend", "--model", "m", "--out", "o", "--allow-small-holdout"])
    assert config_from_args(RNPConfig, args).allow_small_holdout
    args = build_parser().parse_args(["defend", "--model", "m", "--out", "o"])
    assert not config_from_args(RNPConfig, args).allow_small_holdout


def test_the_default_data_settings_are_refused_within_seconds_before_torch_is_imported(tmp_path):
    """The issue's command: the bundled model with the default data settings."""
    out = tmp_path / "defaults"
    command = ["defend", "--model", str(DEMO_MODEL), "--arch", "resnet18", "--width", "0.25"]
    command += ["--dataset", "digits", "--out", str(out)]
    script = (
        "import sys\nfrom rnp_fast.cli import main\ncode = main(sys.argv[1:])\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported')\nsys.exit(code)"
    )
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs at least 50" in lines[0] and "--ratio" in lines[0], result.stderr
    assert result.stdout.strip() == "torch not imported"
    assert seconds < 5, seconds
    assert not out.exists()


def digits_subset(count: int):
    digits = digits_source()
    return digits, (digits.train.images[:count], digits.train.labels[:count])


def tiny_model():
    torch.manual_seed(0)
    return build_model("resnet18", 10, TINY_WIDTH)


def test_the_python_api_refuses_before_any_work_and_runs_with_the_opt_in(tmp_path):
    digits, defense = digits_subset(60)
    settings = dict(mean=digits.mean, std=digits.std, engine=rnp_fast.EngineConfig(device="cpu", quiet=True))
    short = dict(unlearning_epochs=0, recovering_epochs=1, pruning_step=0.3)
    with pytest.raises(UserError, match="6 held-out images .*at least 50"):
        rnp_fast.defend(tiny_model(), defense, rnp=rnp_fast.RNPConfig(**short), **settings)
    result = rnp_fast.defend(
        tiny_model(), defense, rnp=rnp_fast.RNPConfig(**short, allow_small_holdout=True), **settings
    )
    summary = result.summary
    assert summary["holdout_acc_before_n"] == 6 and summary["rule_warning"]  # 6 images: a wide interval
    assert summary["verdict"] is None and "no verdict" in summary["verdict_reason"]  # no test sets given
    assert summary["asr_after"] is None and summary["asr_after_reason"] == "no triggered test images"
    files = strict_json_files(result.save(tmp_path / "api"))
    assert files["summary.json"]["clean_acc_before"] is None and "diagnostics.json" in files
    with pytest.raises(UserError, match="success needs test and poisoned"):
        rnp_fast.defend(tiny_model(), defense, success=rnp_fast.Goal(), **settings)


SWEEP = """\
fixed:
  data: {dataset: digits, ratio: 0.3}
  model: {arch: resnet18, width: 0.125}
axes:
  rnp.tolerance: [0.05, 0.02]
"""


def test_a_sweep_is_refused_when_expanded_naming_the_job(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP, encoding="utf-8")
    with pytest.raises(UserError) as refused:  # 36 held-out images: enough at 0.05 (20), not at 0.02 (50)
        load_sweep(path)
    assert "36 held-out images" in str(refused.value) and "rnp.tolerance=0.02" in str(refused.value)
    path.write_text(SWEEP.replace("ratio: 0.3}", "ratio: 0.3}\n  rnp: {allow_small_holdout: true}"))
    jobs = load_sweep(path).jobs
    assert len(jobs) == 2 and all(job.rnp.allow_small_holdout for job in jobs)


def test_the_opt_in_left_unset_keeps_a_jobs_hash(tmp_path):
    """Stores made before the flag existed still recognise their finished jobs: the job's hash is
    the one rnp-fast computed before --allow-small-holdout existed (commit 515bfe1)."""
    from dataclasses import replace

    from rnp_fast.sweep.job import without_unset_later_fields

    config = {"model": {}, "rnp": {"alpha": 0.2, "allow_small_holdout": False}}
    assert without_unset_later_fields(config)["rnp"] == {"alpha": 0.2}
    path = tmp_path / "hash.yaml"
    path.write_text(HASHED_SWEEP, encoding="utf-8")
    job = load_sweep(path).jobs[0]
    assert (job.hash, job.train_hash) == ("eddfd4fceff5a21d", "60b864543b12781e")
    assert replace(job, rnp=replace(job.rnp, allow_small_holdout=True)).hash != job.hash


HASHED_SWEEP = """\
name: hash-check
fixed:
  data: {dataset: digits, ratio: 0.3, holdout: 0.3, batch_size: 32}
  model: {arch: resnet18, width: 0.125}
  train: {epochs: 2}
axes:
  seed: [0]
"""


def test_a_wide_interval_on_enough_images_runs_with_a_warning():
    wide = Estimate(106 / 108, 108, wilson(106, 108))  # the demo's held-out images: 6 points wide
    warning = rule_warning(wide, 0.02, "held-out images")
    assert "108 held-out images" in warning and "points wide" in warning and "images would narrow" in warning
    narrow = Estimate(0.999, 20_000, wilson(19_980, 20_000))
    assert rule_warning(narrow, 0.02, "held-out images") is None


def test_the_readmes_sweep_example_expands(tmp_path):
    """The README's sweep file holds out enough images for the rule (it would be refused otherwise)."""
    path = tmp_path / "digits-attacks.yaml"
    path.write_text(benchmark_module("readme_sweep").readme_yaml(), encoding="utf-8")
    assert len(load_sweep(path).jobs) == 12
