"""Every command, bad input: one line on stderr naming the problem, exit code 2, nothing written.

The table spans flags, model files, dataset directories, trigger files, .beton files, sweep files
and output paths. (More cases per area live beside their features; this is the cross-command view.)
"""

from __future__ import annotations

import copy
import fractions
import importlib.util
import pickle
import warnings

import numpy as np
import pytest
import torch
from tests_support import TINY_WIDTH
from torch import nn

import rnp_fast
from rnp_fast.cli import main
from rnp_fast.errors import UserError
from rnp_fast.models import build_model

DIGITS = ["--dataset", "digits", "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("inputs")
    (root / "corrupt.pth").write_bytes(b"this is not a checkpoint")
    # pickles holding more than tensors: a raw pickle (torch warns about its protocol) and a torch.save
    # zip (torch's refusal carries terminal escapes); neither may reach the user's one line as such
    (root / "raw_pickle.pth").write_bytes(pickle.dumps({"state_dict": fractions.Fraction(1, 3)}, protocol=4))
    torch.save({"state_dict": fractions.Fraction(1, 3)}, root / "object.pth")
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
    # --allow-small-holdout: the default data's one held-out image would be refused before these inputs
    return ["defend", "--model", model, "--out", "{out}", *DIGITS, "--allow-small-holdout", *extra]


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
    "defend: zero epochs": (
        defend("{model}", "--recovering-epochs", "0"),
        "--recovering-epochs must be in 1..10,000, got 0",
    ),
    "defend: negative schedule milestone": (
        defend("{model}", "--schedule", "20", "-3"),
        "--schedule milestones must be >= 0, got [20, -3]",
    ),
    "defend: negative seed": (defend("{model}", "--seed", "-1"), "--seed must be in 0..9223372036854775807"),
    "defend: raw pickle checkpoint": (defend("{root}/raw_pickle.pth"), "refused to load"),
    "defend: pickled object checkpoint": (defend("{root}/object.pth"), "refused to load"),
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
    "train-backdoor: zero epochs": (train("--epochs", "0"), "--epochs must be in 1..10,000, got 0"),
    "train-backdoor: negative poisoning seed": (train("--poison-seed", "-1"), "--poison-seed must be in 0.."),
    "train-backdoor: corrupt .beton": (train("--train-beton", "{root}/corrupt.beton"), "corrupt.beton"),
    "convert: unknown source": (["convert", "mnist", "{out}.beton"], "unknown dataset"),
    "sweep: unknown key": (["sweep", "{root}/unknown_key.yaml", "--store", "{out}"], "nonsense"),
    "sweep: empty axis": (["sweep", "{root}/empty_axis.yaml", "--store", "{out}"], "empty"),
    "sweep: wrong type": (["sweep", "{root}/wrong_type.yaml", "--store", "{out}"], "rnp.alpha"),
    "sweep: missing file": (["sweep", "{root}/none.yaml", "--store", "{out}"], "none.yaml"),
    "report: not a sweep store": (["report", "{root}/empty_folder", "--out", "{out}"], "empty_folder"),
    "bench: zero repeats": (
        ["bench", "--repeats", "0", "--out", "{out}.json"],
        "--repeats must be in 1..10,000, got 0",
    ),
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


@pytest.mark.parametrize("name", ["raw_pickle.pth", "object.pth"])
def test_a_refused_pickle_says_so_without_torch_warnings_or_terminal_escapes(name, files, tmp_path, capsys):
    values = {"root": str(files["root"]), "model": str(files["model"]), "out": str(tmp_path / "out")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([arg.format(**values) for arg in defend(f"{{root}}/{name}")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "refused to load" in err, err
    assert "\x1b" not in err and all(c.isprintable() for c in err.strip()), repr(err)
    assert [str(w.message) for w in caught] == []


class ReturnsATuple(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), x.mean()


def api_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet18", 10, TINY_WIDTH)
    if kind == "tuple":
        return ReturnsATuple(model)
    if kind == "frozen":
        return copy.deepcopy(model).requires_grad_(False)
    if kind == "meta":
        return model.to("meta")
    return model


# name -> (model kind, defense labels' largest value, test labels' largest value, what the UserError says)
API_CASES = {
    "defense labels beyond the model's classes": (
        "plain",
        42,
        9,
        "defense: label 42 is outside the model's 10 classes",
    ),
    "test labels beyond the classes": ("plain", 9, 10, "test: label 10 is outside the model's 10 classes"),
    "a forward returning a tuple": ("tuple", 9, 9, "the model's forward returned a tuple"),
    "a model on the meta device": ("meta", 9, 9, "is on the meta device"),
    "a model with every parameter frozen": ("frozen", 9, 9, "every parameter of the model is frozen"),
}


@pytest.mark.parametrize("case", list(API_CASES))
def test_the_python_api_names_the_problem_before_any_work(case):
    kind, defense_top, test_top, expected = API_CASES[case]
    images = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    labels = torch.arange(20) % 10
    defense_labels, test_labels = labels.clone(), labels.clone()
    defense_labels[0], test_labels[0] = defense_top, test_top
    with pytest.raises(UserError) as refused:
        rnp_fast.defend(
            api_model(kind),
            (images, defense_labels),
            test=(images, test_labels),
            mean=(0.5, 0.5, 0.5),
            std=(0.25, 0.25, 0.25),
            rnp=rnp_fast.RNPConfig(unlearning_epochs=0, recovering_epochs=1),
            engine=rnp_fast.EngineConfig(device="cpu", quiet=True),
        )
    assert expected in str(refused.value) and "\n" not in str(refused.value)
