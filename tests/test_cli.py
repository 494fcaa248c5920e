"""The command line as a process: no traceback, malicious pickles refused, --help everywhere.

The table of bad inputs across every command is tests/test_bad_inputs.py."""

import pickle
import subprocess
import sys

import pytest
from tests_support import TINY_WIDTH

from rnp_fast.cli import main


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
        "--allow-small-holdout",  # the default data's one held-out image: tiny runs, the rule's power tested apart
        *extra,
    ]


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


@pytest.mark.parametrize("command", ["defend", "train-backdoor", "demo", "convert", "sweep", "report", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: rnp-fast {command}" in capsys.readouterr().out


def test_the_old_scoring_flag_names_are_refused(capsys, tmp_path):
    """--sweep-mode / --sweep-chunk (engine.sweep_mode, engine.sweep_chunk) were renamed to
    --scoring / --scoring-chunk; the old names are gone, and refused as any unknown flag or key."""
    from rnp_fast.cli import build_parser
    from rnp_fast.sweep.spec import SweepFileError, load_sweep

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["defend", "--model", "m", "--out", "o", "--sweep-mode", "sequential"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --sweep-mode" in capsys.readouterr().err
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("fixed:\n  engine: {sweep_chunk: 3}\n")
    with pytest.raises(SweepFileError, match="engine.sweep_chunk: unknown key"):
        load_sweep(sweep_file)
