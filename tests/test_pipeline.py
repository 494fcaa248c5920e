"""End-to-end defense on the digits set with a tiny model: outputs, reuse paths, and parity
between the fast path and the reference mode."""

import json
import os
import stat
from dataclasses import replace

import pytest
import torch
from tests_support import TINY_WIDTH, strict_json_files

from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig
from rnp_fast.defense import DefendJob, run_defense
from rnp_fast.report import read_mask_file

SHORT = dict(unlearning_epochs=2, recovering_epochs=3, clean_threshold=0.0, pruning_step=0.15)  # no early stop
SHORT["allow_small_holdout"] = True  # 12 held-out images: tiny data, the rule's power is tested apart


def job(model, out, mode="fast", **overrides) -> DefendJob:
    rnp = {**SHORT, **overrides.pop("rnp", {})}
    return DefendJob(
        model_path=str(model),
        out=str(out),
        model=ModelConfig(width=TINY_WIDTH),
        data=DataConfig(dataset="digits", ratio=0.1, batch_size=32, eval_batch_size=256),
        attack=AttackConfig(),
        rnp=RNPConfig(**rnp),
        engine=EngineConfig(device="cpu", mode=mode, quiet=True),
        **overrides,
    )


@pytest.fixture(scope="module")
def fast_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "fast"
    return out, run_defense(job(tiny_checkpoint, out))


def test_run_directory_has_every_output(fast_run):
    out, summary = fast_run
    names = {p.name for p in out.iterdir()}
    assert names >= {
        "mask_values.txt",
        "pruning_by_threshold.txt",
        "pruning.csv",
        "pruning.png",
        "summary.json",
        "config.json",
        "output.log",
        "purified.safetensors",
        "purified.pth",
    }
    stored = json.loads((out / "summary.json").read_text())
    for key in ("clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "threshold", "pruned", "seconds"):
        assert key in stored
    assert stored["unlearning_reached_threshold"] is False  # clean_threshold 0 is never reached
    assert len(read_mask_file(out / "mask_values.txt")) == 600  # width 0.125: 4,800 / 8 channels
    table = (out / "pruning_by_threshold.txt").read_text().splitlines()
    assert table[0].startswith("No \t Layer Name") and len(table) == 1 + 7  # thresholds 0, 0.15, ..., 0.9
    config = json.loads((out / "config.json").read_text())
    assert config["versions"]["torch"] == torch.__version__ and config["RNPConfig"]["alpha"] == 0.2
    assert "Model Unlearning" in (out / "output.log").read_text()


def test_every_figure_has_its_count_and_interval_and_the_run_a_verdict(fast_run):
    out, _ = fast_run
    summary = strict_json_files(out)["summary.json"]  # strict: NaN or Infinity would raise
    for name in ("clean_acc", "asr", "clean_acc_full", "robust_acc"):
        for when in ("before", "after"):
            value, n, (lo, hi) = (summary[f"{name}_{when}{part}"] for part in ("", "_n", "_ci95"))
            assert n > 0 and lo <= value <= hi, (name, when)
    assert summary["clean_acc_full_before_n"] == 599 and summary["clean_acc_before_n"] == summary["asr_before_n"]
    drop = summary["clean_acc_full_drop"]
    assert drop == summary["clean_acc_full_before"] - summary["clean_acc_full_after"]
    assert summary["clean_acc_full_drop_ci95"][0] <= drop <= summary["clean_acc_full_drop_ci95"][1]
    verdict = summary["verdict"]
    assert verdict["success"] == (not verdict["failed"]) and verdict["asr_after"]["n"] == summary["asr_after_n"]
    assert verdict["clean_acc_full_drop"]["value"] == drop
    assert verdict["goal"] == {"max_asr": 0.1, "max_clean_drop": 0.02}
    assert summary["holdout_acc_before_n"] == 12 and summary["rule_warning"]  # 12 images: far too wide for 2 points
    log = (out / "output.log").read_text()
    assert f"verdict: {verdict['text']}" in log and "WARNING: the unpruned model's accuracy on the 12" in log
    assert "scoring the pruning candidates on the test sets" in log  # progress while scoring


def test_thresholds_are_written_as_decimals_but_the_reference_table_keeps_its_floats(fast_run):
    out, _ = fast_run
    labels = [row.split(",")[1] for row in (out / "pruning.csv").read_text().splitlines()[1:]]
    assert labels == ["0.0", "0.15", "0.3", "0.45", "0.6", "0.75", "0.9"]
    table = [row.split("\t")[3].strip() for row in (out / "pruning_by_threshold.txt").read_text().splitlines()[1:]]
    assert table == [repr(i * 0.15) for i in range(7)] and "0.44999999999999996" in table  # the reference's i * step
    assert "0.44999999999999996" not in (out / "output.log").read_text() + (out / "summary.json").read_text()
    header = (out / "pruning.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["holdout_acc_n", "holdout_acc_ci95_lo", "holdout_acc_ci95_hi"] and "asr_ci95_hi" in header


def test_the_purified_model_honours_the_umask_like_every_other_file(fast_run):
    out, _ = fast_run
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert modes["purified.safetensors"] == modes["summary.json"] == 0o666 & ~umask, modes


def test_purified_model_has_the_chosen_channels_zeroed(fast_run):
    from safetensors.torch import load_file

    out, summary = fast_run
    state = load_file(str(out / "purified.safetensors"))
    zero = sum(int((state[k] == 0).sum()) for k in state if k.endswith(".weight") and state[k].dim() == 1)
    assert zero >= summary["pruned"]


def test_fast_and_reference_modes_agree(fast_run, tiny_checkpoint, tmp_path):
    """Same seeded order and augmentation: same stop epoch, masks within 1e-4, identical tables."""
    fast_out, fast_summary = fast_run
    ref_summary = run_defense(job(tiny_checkpoint, tmp_path / "ref", mode="reference"))
    assert ref_summary["unlearning_stop_epoch"] == fast_summary["unlearning_stop_epoch"]
    fast_masks = read_mask_file(fast_out / "mask_values.txt")
    ref_masks = read_mask_file(tmp_path / "ref" / "mask_values.txt")
    assert [(c.layer, c.index) for c in fast_masks] == [(c.layer, c.index) for c in ref_masks]
    assert max(abs(a.value - b.value) for a, b in zip(fast_masks, ref_masks, strict=True)) <= 1e-4
    assert (fast_out / "pruning_by_threshold.txt").read_text() == (
        tmp_path / "ref" / "pruning_by_threshold.txt"
    ).read_text()
    assert "PoisonACC" in (tmp_path / "ref" / "output.log").read_text()


def test_mask_file_skips_learning_and_reproduces_the_table(fast_run, tiny_checkpoint, tmp_path):
    fast_out, _ = fast_run
    summary = run_defense(job(tiny_checkpoint, tmp_path / "reuse", mask_file=str(fast_out / "mask_values.txt")))
    assert summary["unlearning_stop_epoch"] is None and "unlearn" not in summary["timings"]
    assert (tmp_path / "reuse" / "mask_values.txt").read_text() == (fast_out / "mask_values.txt").read_text()


def test_unlearned_model_skips_unlearning(tiny_checkpoint, tmp_path):
    summary = run_defense(job(tiny_checkpoint, tmp_path / "u", unlearned_model=str(tiny_checkpoint)))
    assert "unlearn" not in summary["timings"] and "recover" in summary["timings"]


def test_fixed_threshold_overrides_the_rule(tiny_checkpoint, tmp_path):
    summary = run_defense(job(tiny_checkpoint, tmp_path / "t", rnp={"threshold": 0.5, "recovering_epochs": 1}))
    assert summary["threshold"] == 0.5 and summary["rule"].startswith("fixed")


def test_pruning_by_number(tiny_checkpoint, tmp_path):
    out = tmp_path / "n"
    run_defense(job(tiny_checkpoint, out, rnp={"pruning_by": "number", "pruning_max": 40, "pruning_step": 10}))
    rows = (out / "pruning_by_number.txt").read_text().splitlines()[1:]
    assert [row.split("\t")[0].strip() for row in rows] == ["10", "20", "30", "40"]


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_deterministic_runs_in_both_modes(fast_run, tiny_checkpoint, tmp_path, mode):
    """--deterministic turns on PyTorch's deterministic kernels (raising on any op without one) in
    either mode; on the CPU the run was already deterministic, so the masks do not move."""
    fast_out, _ = fast_run
    out = tmp_path / mode
    base = job(tiny_checkpoint, out, mode=mode)
    try:
        run_defense(replace(base, engine=replace(base.engine, deterministic=True)))
        assert torch.are_deterministic_algorithms_enabled()
    finally:  # process-wide switches: leave them as the other tests expect
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    masks, expected = read_mask_file(out / "mask_values.txt"), read_mask_file(fast_out / "mask_values.txt")
    assert max(abs(a.value - b.value) for a, b in zip(masks, expected, strict=True)) <= 1e-4
