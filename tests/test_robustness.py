"""Robustness: diverging unlearning, reproducibility, and runs killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_pipeline import job
from tests_support import TINY_WIDTH

from rnp_fast.config import RNPConfig
from rnp_fast.defense import run_defense
from rnp_fast.errors import UserError
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.sources import load_source
from rnp_fast.models import build_model
from rnp_fast.outputs import RunDirectory
from rnp_fast.unlearn import unlearn

CPU = torch.device("cpu")


class PoisonedEpochLoader:
    """Wraps a loader and turns every image into NaN from ``bad_epoch`` on (a diverging run)."""

    def __init__(self, loader, bad_epoch: int):
        self.loader, self.bad_epoch, self.epoch = loader, bad_epoch, 0
        self.num_images = loader.num_images

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for images, labels in self.loader:
            yield (images * float("nan") if self.epoch >= self.bad_epoch else images), labels


def tiny_loader():
    source = load_source("digits")
    return DeviceLoader(source.train.subset(torch.arange(64)), source.mean, source.std, 32, CPU, seed=0)


def test_divergence_keeps_the_last_finite_state():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, TINY_WIDTH)
    config = RNPConfig(unlearning_epochs=5, early_stop=False)
    result = unlearn(model, PoisonedEpochLoader(tiny_loader(), bad_epoch=2), config)
    assert result.diverged_epoch == 2 and result.stop_epoch == 1
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    # the kept state is the one after epoch 1: rerunning two clean epochs gives the same weights
    again = unlearn(model, tiny_loader(), RNPConfig(unlearning_epochs=1, early_stop=False))
    kept, rerun = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(kept[key], rerun[key]) for key in kept)


def test_divergence_in_the_first_epoch_is_a_clear_error():
    model = build_model("resnet18", 10, TINY_WIDTH)
    with pytest.raises(UserError, match="unlearning diverged in its first epoch .* lower --unlearning-lr"):
        unlearn(model, PoisonedEpochLoader(tiny_loader(), bad_epoch=0), RNPConfig())


def test_a_huge_learning_rate_stops_cleanly(tiny_checkpoint, tmp_path):
    out = tmp_path / "huge"
    try:
        summary = run_defense(job(tiny_checkpoint, out, rnp={"unlearning_lr": 1e30}))
    except UserError as error:  # diverged in the first epoch: nothing written
        assert "lower --unlearning-lr" in str(error)
        assert not out.exists()
    else:
        assert summary["unlearning_diverged_epoch"] is not None


def test_same_seed_gives_byte_identical_masks_and_tables(tiny_checkpoint, tmp_path):
    for name in ("a", "b"):
        run_defense(job(tiny_checkpoint, tmp_path / name))
    for file in ("mask_values.txt", "pruning_by_threshold.txt", "pruning.csv"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "seed" in config["DataConfig"] and "poison_seed" in config["AttackConfig"]  # every seed recorded


def defend_command(model: Path, out: Path, recovering_epochs: int) -> list[str]:
    return [
        sys.executable,
        *("-m", "rnp_fast", "defend", "--model", str(model), "--out", str(out)),
        *("--dataset", "digits", "--width", str(TINY_WIDTH), "--ratio", "0.1", "--batch-size", "32"),
        *("--unlearning-epochs", "1", "--recovering-epochs", str(recovering_epochs), "--clean-threshold", "0"),
        *("--device", "cpu", "--quiet", "--allow-small-holdout"),
    ]


@pytest.mark.heavy
def test_sigkill_never_leaves_a_half_written_run(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    started = time.perf_counter()
    subprocess.run(defend_command(tiny_checkpoint, out, 2), check=True, capture_output=True, timeout=600)
    full_run = time.perf_counter() - started
    previous = {p.name: p.read_bytes() for p in out.iterdir()}
    rng = random.Random(0)
    for point in sorted(rng.uniform(0.05, 1.0) for _ in range(6)):  # fractions of a full run
        process = subprocess.Popen(
            defend_command(tiny_checkpoint, out, 3), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(point * full_run)
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = {p.name: p.read_bytes() for p in out.iterdir()} if out.exists() else None
        if now != previous:  # the kill came after the swap: the new result, complete
            assert now is not None and "summary.json" in now and "purified.safetensors" in now
            json.loads(now["summary.json"])
            previous = now
    # a later run clears what the killed ones left beside the output directory
    subprocess.run(defend_command(tiny_checkpoint, out, 2), check=True, capture_output=True, timeout=600)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")] == []


def test_a_run_killed_mid_swap_gets_its_previous_result_back(tmp_path):
    target = tmp_path / "out"
    with RunDirectory(target) as run:
        run.write_text("summary.json", "{}")
    # simulate a dead writer's swap: previous result moved aside, new one not yet in place
    dead_pid = 2**22 + 12345
    while True:
        try:
            os.kill(dead_pid, 0)
            dead_pid += 1
        except ProcessLookupError:
            break
    aside = tmp_path / f".out.old-{dead_pid}-abc"
    aside.mkdir()
    os.replace(target, aside / "previous")
    (tmp_path / f".out.partial-{dead_pid}-xyz").mkdir()
    with RunDirectory(target) as run:
        assert (target / "summary.json").read_text() == "{}"  # restored before the new run starts
        run.write_text("summary.json", '{"new": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
