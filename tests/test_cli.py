"""Bad input: one line on stderr, exit code 2, no traceback, no output directory."""

import pickle
import subprocess
import sys

import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.cli import main
from rnp_fast.models import build_model


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.pth").write_bytes(b"this is not a checkpoint")
    torch.save({"state_dict": build_model("vgg19_bn", 10, TINY_WIDTH).state_dict()}, root / "vgg.pth")
    torch.save(build_model("resnet18", 7, TINY_WIDTH).state_dict(), root / "classes7.pth")
    return root


def defend_args(model, out, *extra):
    return [
        "defend",
        "--model",
        str(model),
        "--out",
        str(out),
        "--dataset",
        "digits",
        "--width",
        str(TINY_WIDTH),
        "--device",
        "cpu",
        "--quiet",
        *extra,
    ]


BAD_INPUTS = {
    "missing model file": (lambda f, c: f / "nope.pth", [], "model file not found"),
    "corrupt model file": (lambda f, c: f / "corrupt.pth", [], "cannot read model file"),
    "other architecture": (lambda f, c: f / "vgg.pth", [], "does not match --arch resnet18: missing keys"),
    "wrong class count": (lambda f, c: f / "classes7.pth", [], "wrong number of classes"),
    "unknown arch": (lambda f, c: c, ["--arch", "resnet7"], "unknown architecture 'resnet7'"),
    "unknown dataset": (lambda f, c: c, ["--dataset", "mnist"], "unknown dataset 'mnist'"),
    "missing cifar dir": (lambda f, c: c, ["--dataset", "cifar10", "--data-dir", "/nonexistent"], "CIFAR-10 not found"),
    "negative lr": (lambda f, c: c, ["--unlearning-lr", "-0.1"], "--unlearning-lr must be > 0"),
    "threshold > 1": (lambda f, c: c, ["--threshold", "1.5"], "--threshold must be in [0, 1]"),
    "ratio <= 0": (lambda f, c: c, ["--ratio", "0"], "--ratio must be in (0, 1]"),
    "zero epochs": (lambda f, c: c, ["--recovering-epochs", "0"], "--recovering-epochs must be >= 1"),
    "target outside classes": (lambda f, c: c, ["--target", "12"], "--target 12 is outside"),
    "gpu absent": (lambda f, c: c, ["--device", "cuda"], "CUDA is not available"),
    "missing mask file": (lambda f, c: c, ["--mask-file", "/nonexistent.txt"], "mask file not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, tiny_checkpoint, tmp_path, capsys):
    if case == "gpu absent" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    model, extra, expected = BAD_INPUTS[case]
    out = tmp_path / "run"
    code = main(defend_args(model(files, tiny_checkpoint), out, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_output_path_that_is_a_file(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main(defend_args(tiny_checkpoint, target)) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"state_dict": Exploit()}))
    assert main(defend_args(path, tmp_path / "out")) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists()


def test_cli_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rnp_fast", *defend_args(tmp_path / "none.pth", tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"rnp-fast: error: model file not found: {tmp_path / 'none.pth'}"


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["defend", "--model", "x"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["defend", "train-backdoor", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out
