"""rnp-fast never destroys what it did not make, and refuses wrong content, not only wrong syntax.

Every case runs one command inside a sentinel tree (a home folder, a current folder with a
user's files, a non-empty folder of the user's, the inputs) and asserts: the exit code, one line
on stderr without a traceback that says what is wrong, and that no file anywhere in the tree was
created, changed or removed (every file hashed before and after).
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.cli import main
from rnp_fast.models import build_model
from rnp_fast.outputs import MARKER
from rnp_fast.prune import Channel, batchnorm_sizes
from rnp_fast.report import format_mask_values
from rnp_fast.sweep.store import ResultsStore

DIGITS = ["--dataset", "digits", "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]
SHORT = ["--ratio", "0.1", "--batch-size", "32", "--unlearning-epochs", "0", "--recovering-epochs", "1"]
SWEEP = "name: s\nfixed: {data: {dataset: digits}, model: {width: 0.125}}\n"


def tiny_masks() -> list[Channel]:
    sizes = batchnorm_sizes(build_model("resnet18", 10, TINY_WIDTH))
    return [Channel(layer, i, 0.5) for layer, count in sizes.items() for i in range(count)]


def write_mask_variants(folder: Path) -> None:
    channels = tiny_masks()
    text = format_mask_values(channels)
    lines = text.splitlines(keepends=True)
    (folder / "nan.txt").write_text(text.replace("0.5000", "nan", 1))
    (folder / "negative.txt").write_text(lines[0] + lines[1].replace("0.5000", "-5") + "".join(lines[2:]))
    (folder / "half.txt").write_text("".join(lines[: 1 + len(channels) // 2]))
    (folder / "duplicated.txt").write_text(text + lines[5])
    (folder / "extra_columns.txt").write_text(lines[0] + lines[1].rstrip() + " \t 7\n" + "".join(lines[2:]))
    (folder / "masks_dir").mkdir()


def write_bad_checkpoints(folder: Path) -> None:
    torch.manual_seed(0)
    state = build_model("resnet18", 10, TINY_WIDTH).state_dict()
    for dtype in (torch.int32, torch.bool, torch.complex64):
        broken = dict(state, **{"layer1.0.bn1.weight": state["layer1.0.bn1.weight"].to(dtype)})
        torch.save(broken, folder / f"{str(dtype).removeprefix('torch.')}.pth")


def write_sweep_files(folder: Path) -> None:
    thousand = "[" + ", ".join(str(i) for i in range(100)) + "]"
    (folder / "million.yaml").write_text(
        SWEEP + f"axes: {{seed: {thousand}, rnp.alpha: {thousand}, rnp.unlearning_lr: {thousand}}}\n"
    )
    (folder / "huge.yaml").write_text(SWEEP + "# padding\n" * 120_000)
    (folder / "small.yaml").write_text(SWEEP + "axes: {seed: [0]}\n")


@pytest.fixture
def world(tmp_path, tiny_checkpoint, monkeypatch):
    """The sentinel tree; the test runs with its ``cwd`` as the current folder and ``home`` as HOME."""
    home, cwd, inputs = tmp_path / "home", tmp_path / "cwd", tmp_path / "inputs"
    for folder in (home, cwd / "photos", inputs, tmp_path / "v", tmp_path / "empty"):
        folder.mkdir(parents=True)
    (home / "notes.txt").write_text("my notes")
    (cwd / "thesis.tex").write_text("\\documentclass{article}")
    (cwd / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "v" / "keep").write_text("x")
    shutil.copy(tiny_checkpoint, inputs / "model.safetensors")
    write_mask_variants(inputs)
    write_bad_checkpoints(inputs)
    write_sweep_files(inputs)
    store = tmp_path / "store"
    ResultsStore(store).close()
    (store / MARKER).write_text('{"made_by": "rnp-fast"}')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return tmp_path


def defend(*extra: str, out: str = "{w}/new-run") -> list[str]:
    return ["defend", "--model", "{w}/inputs/model.safetensors", "--out", out, *DIGITS, *SHORT, *extra]


def with_mask(name: str) -> list[str]:
    return defend("--mask-file", f"{{w}}/inputs/{name}")


def with_model(name: str) -> list[str]:
    return ["defend", "--model", f"{{w}}/inputs/{name}", "--out", "{w}/new-run", *DIGITS]


# name -> (argv, with {w} for the sentinel tree, the text its one line must hold)
CASES = {
    # output ownership: nothing that rnp-fast did not make is replaced
    "demo into a user's folder": (["demo", "--out", "{w}/v"], "was not made by rnp-fast"),
    "demo into the current folder": (["demo", "--out", "."], "current folder"),
    "demo into the empty string": (["demo", "--out", ""], "--out is empty"),
    "demo into the home folder": (["demo", "--out", "~"], "home folder"),
    "demo into the root folder": (["demo", "--out", "/"], "root folder"),
    "demo into a folder above the current one": (["demo", "--out", ".."], "current folder or one above"),
    "defend into a user's folder": (defend(out="{w}/v"), "was not made by rnp-fast"),
    "defend into the folder holding the model": (defend(out="{w}/inputs"), "which this command reads"),
    "defend into an existing file": (defend(out="{w}/v/keep"), "exists and is not a directory"),
    "defend into a name too long": (defend(out="{w}/" + "n" * 300), "File name too long"),
    "train-backdoor into a user's folder": (
        ["train-backdoor", "--out", "{w}/v", *DIGITS, "--epochs", "1"],
        "was not made by rnp-fast",
    ),
    "report into a user's folder": (["report", "{w}/store", "--out", "{w}/v"], "was not made by rnp-fast"),
    "report into the store itself": (["report", "{w}/store", "--out", "{w}/store"], "which this command reads"),
    "report into the current folder": (["report", "{w}/store", "--out", "."], "current folder"),
    "sweep into a user's folder": (["sweep", "{w}/inputs/small.yaml", "--store", "{w}/v"], "was not made by rnp-fast"),
    "sweep into the folder holding its file": (
        ["sweep", "{w}/inputs/small.yaml", "--store", "{w}/inputs"],
        "which this command reads",
    ),
    "bench onto a user's file, before the work": (["bench", "--out", "{w}/home/notes.txt"], "was not made by rnp-fast"),
    "bench onto a folder, before the work": (["bench", "--out", "{w}/empty"], "is a directory"),
    "bench onto the empty string": (["bench", "--out", ""], "--out is empty"),
    # mask files must list every BatchNorm channel once, each value finite and in [0, 1]
    "mask file with NaN": (with_mask("nan.txt"), "line 2: mask value nan is not a number in [0, 1]"),
    "mask file with -5": (with_mask("negative.txt"), "line 2: mask value -5 is not a number in [0, 1]"),
    "mask file missing half its rows": (with_mask("half.txt"), "lists 300 of the model's 600 BatchNorm channels"),
    "mask file with a duplicated row": (with_mask("duplicated.txt"), "line 602: channel bn1[4] is listed twice"),
    "mask file with extra columns": (with_mask("extra_columns.txt"), "line 2: expected 4 columns"),
    "mask file that is a folder": (with_mask("masks_dir"), "is a directory"),
    # checkpoints: floating-point weights stored as other types are refused, not cast
    "checkpoint with int32 weights": (with_model("int32.pth"), "layer1.0.bn1.weight is stored as int32"),
    "checkpoint with bool weights": (with_model("bool.pth"), "layer1.0.bn1.weight is stored as bool"),
    "checkpoint with complex weights": (with_model("complex64.pth"), "layer1.0.bn1.weight is stored as complex64"),
    "model that is a folder": (with_model(""), "is a directory"),
    # data and sweeps
    "holdout that leaves too few images": (defend("--holdout", "0.99"), "--holdout 0.99 holds"),
    "sweep of a million jobs": (["sweep", "{w}/inputs/million.yaml", "--store", "{w}/s"], "1,000,000 jobs"),
    "sweep file over 1 MB": (["sweep", "{w}/inputs/huge.yaml", "--store", "{w}/s"], "at most 1,000,000"),
}


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: path -> content hash ('dir' for folders)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_refused_with_one_line_and_nothing_touched(case, world, capsys):
    argv, expected = CASES[case]
    before = tree_digest(world)
    code, err = run_cli([arg.replace("{w}", str(world)) for arg in argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert tree_digest(world) == before, "a file outside the run's own directory changed"


def test_the_table_covers_at_least_20_cases():
    assert len(CASES) >= 20


def test_rerun_replaces_our_own_run_atomically_and_holdout_0_says_where_the_threshold_came_from(world, capsys):
    """--holdout 0 chooses on the training images and says so; a rerun replaces our own run."""
    out = world / "run"
    argv = [a.replace("{w}", str(world)) for a in defend("--holdout", "0", out=str(out))]
    assert run_cli(argv, capsys)[0] == 0
    summary = (out / "summary.json").read_text()
    assert '"rule_data": "training images"' in summary and "on the training images" in summary
    assert "threshold is chosen on the training images" in (out / "output.log").read_text()
    (out / "stale.txt").write_text("from the first run")
    before = tree_digest(world / "cwd")
    assert run_cli(argv + ["--threshold", "0.5"], capsys)[0] == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()  # replaced as a whole
    assert tree_digest(world / "cwd") == before
    assert [p.name for p in world.iterdir() if p.name.startswith(".run.")] == []


def test_an_empty_folder_is_a_fine_output(world, capsys):
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(world / "empty"))]
    assert run_cli(argv, capsys)[0] == 0
    assert (world / "empty" / "summary.json").is_file() and (world / "empty" / MARKER).is_file()


def test_an_os_error_mid_run_is_one_line_exit_1_and_keeps_the_previous_result(world, capsys, monkeypatch):
    out = world / "run"
    argv = [a.replace("{w}", str(world)) for a in defend("--threshold", "0.5", out=str(out))]
    assert run_cli(argv, capsys)[0] == 0
    previous = tree_digest(out)

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr("rnp_fast.defense.plot_pruning", disk_full)
    code, err = run_cli(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "No space left on device" in err
    assert tree_digest(out) == previous
    assert [p.name for p in world.iterdir() if p.name.startswith(".run.")] == []  # staging removed


def test_the_mask_checks_accept_the_references_published_file(reference_file):
    from rnp_fast.report import read_mask_file

    sizes = batchnorm_sizes(build_model("resnet18", 10))
    channels = read_mask_file(reference_file("mask_values.txt"), sizes)
    assert len(channels) == 4800 and all(0 <= c.value <= 1 and math.isfinite(c.value) for c in channels)
