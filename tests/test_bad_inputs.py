"""Every command, bad input: one line on stderr naming the problem, exit code 2, nothing written.

The table spans flags, model files, dataset directories, trigger files, .beton files, sweep files
and output paths. (More cases per area live beside their features; this is the cross-command view.)
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.cli import main
from rnp_fast.models import build_model

DIGITS = ["--dataset", "digits", "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("inputs")
    (root / "corrupt.pth").write_bytes(b"this is not a checkpoint")
    torch.save({"state_dict": build_model("vgg19_bn", 10, TINY_WIDTH).state_dict()}, root / "vgg.pth")
    torch.save(build_model("resnet18", 7, TINY_WIDTH).state_dict(), root / "classes7.pth")
    (root / "a_file").write_text("not a directory")
    (root / "corrupt.beton").write_bytes(b"garbage" * 100)
    (root / "empty_folder").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(root / "small.png")
    (root / "unknown_key.yaml").write_text("name: s\nfixed: {data: {dataset: digits}}\naxes: {rnp.nonsense: [1, 2]}\n")
    (root / "empty_axis.yaml").write_text("name: s\nfixed: {data: {dataset: digits}}\naxes: {rnp.alpha: []}\n")
    (root / "wrong_type.yaml").write_text("name: s\nfixed: {data: {dataset: digits}}\naxes: {rnp.alpha: [high]}\n")
    return {"root": root, "model": tiny_checkpoint}


def defend(model: str, *extra: str) -> list[str]:
    return ["defend", "--model", model, "--out", "{out}", *DIGITS, *extra]


def train(*extra: str) -> list[str]:
    return ["train-backdoor", "--out", "{out}", *DIGITS, "--epochs", "1", *extra]


# name -> (argv with {root}, {model}, {out} placeholders, what the one line must say)
CASES = {
    "defend: missing model file": (defend("{root}/nope.pth"), "model file not found"),
    "defend: corrupt model file": (defend("{root}/corrupt.pth"), "cannot read model file"),
    "defend: other architecture": (defend("{root}/vgg.pth"), "missing keys"),
    "defend: wrong number of classes": (defend("{root}/classes7.pth"), "wrong number of classes"),
    "defend: unknown arch": (defend("{model}", "--arch", "resnet7"), "unknown architecture"),
    "defend: unknown dataset": (defend("{model}", "--dataset", "mnist"), "unknown dataset"),
    "defend: missing CIFAR directory": (
        defend("{model}", "--dataset", "cifar10", "--data-dir", "{root}/none"),
        "CIFAR-10 not found",
    ),
    "defend: dataset directory of the wrong layout": (
        defend("{model}", "--dataset", "imagefolder", "--data-dir", "{root}/empty_folder"),
        "empty_folder",
    ),
    "defend: negative learning rate": (defend("{model}", "--unlearning-lr", "-1"), "--unlearning-lr must be > 0"),
    "defend: threshold outside [0, 1]": (defend("{model}", "--threshold", "2"), "--threshold must be in [0, 1]"),
    "defend: ratio <= 0": (defend("{model}", "--ratio", "0"), "--ratio must be in (0, 1]"),
    "defend: zero epochs": (defend("{model}", "--recovering-epochs", "0"), "--recovering-epochs must be >= 1"),
    "defend: target outside the classes": (defend("{model}", "--target", "10"), "outside"),
    "defend: a GPU where there is none": (defend("{model}", "--device", "cuda"), "CUDA is not available"),
    "defend: missing mask file": (defend("{model}", "--mask-file", "{root}/none.txt"), "mask file not found"),
    "defend: unknown flag": (defend("{model}", "--no-such-flag"), "unrecognized arguments"),
    "defend: non-number flag": (defend("{model}", "--alpha", "lots"), "invalid float value"),
    "defend: output path is a file": (
        ["defend", "--model", "{model}", "--out", "{root}/a_file", *DIGITS],
        "exists and is not a directory",
    ),
    "defend: output under a file": (
        ["defend", "--model", "{model}", "--out", "{root}/a_file/run", *DIGITS],
        "not writable",
    ),
    "train-backdoor: poisoning rate outside (0, 1]": (train("--poison-rate", "1.5"), "--poison-rate must be in (0, 1]"),
    "train-backdoor: unknown attack": (train("--attack", "rowhammer"), "rowhammer"),
    "train-backdoor: unknown attack parameter": (train("--attack", "blend", "--attack-param", "beta=1"), "beta"),
    "train-backdoor: trigger image of the wrong size": (
        train("--attack", "user", "--attack-param", "pattern={root}/small.png"),
        "small.png",
    ),
    "train-backdoor: zero epochs": (train("--epochs", "0"), "--epochs must be >= 1"),
    "train-backdoor: corrupt .beton": (train("--train-beton", "{root}/corrupt.beton"), "corrupt.beton"),
    "convert: unknown source": (["convert", "mnist", "{out}.beton"], "unknown dataset"),
    "sweep: unknown key": (["sweep", "{root}/unknown_key.yaml", "--store", "{out}"], "nonsense"),
    "sweep: empty axis": (["sweep", "{root}/empty_axis.yaml", "--store", "{out}"], "empty"),
    "sweep: wrong type": (["sweep", "{root}/wrong_type.yaml", "--store", "{out}"], "rnp.alpha"),
    "sweep: missing file": (["sweep", "{root}/none.yaml", "--store", "{out}"], "none.yaml"),
    "report: not a sweep store": (["report", "{root}/empty_folder", "--out", "{out}"], "empty_folder"),
    "bench: zero repeats": (["bench", "--repeats", "0", "--out", "{out}.json"], "--repeats must be >= 1"),
    "demo: output path is a file": (["demo", "--out", "{root}/a_file", "--device", "cpu"], "not a directory"),
    "demo: a GPU where there is none": (["demo", "--out", "{out}", "--device", "cuda"], "CUDA is not available"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, tmp_path, capsys):
    argv, expected = CASES[case]
    if "--train-beton" in argv and importlib.util.find_spec("ffcv") is None:
        expected = "pip install 'rnp-fast[ffcv]'"  # without FFCV the .beton cannot even be opened
    out = tmp_path / "out"
    values = {"root": str(files["root"]), "model": str(files["model"]), "out": str(out)}
    try:
        code = main([arg.format(**values) for arg in argv])
    except SystemExit as exit:  # argparse's errors leave through SystemExit (still one line, code 2)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be written"


def test_the_table_has_at_least_25_cases_across_every_command():
    commands = {argv[0] for argv, _ in CASES.values()}
    assert len(CASES) >= 25
    assert commands >= {"defend", "train-backdoor", "convert", "sweep", "report", "bench", "demo"}
