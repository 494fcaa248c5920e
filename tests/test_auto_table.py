"""The --bn-kernel auto table: benchmarks/bench_masked_bn.py writes it from whole recover-step
timings, and the BatchNorm kernel choice reads it.

The script runs on the CPU with a tiny model (the fused operator is its PyTorch implementation
there: the timings mean nothing, the code path is the one the GPU takes). Its winners are then
forced, since CPU timings decide nothing, to check that the choice follows the table.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.kernels import auto_table
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d, choose_bn_kernels, masked_batchnorm_layers
from rnp_fast.models import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_masked_bn.py"
SHAPE = (4, 3, 8, 8)  # the batch the script measures: 4 images of 8x8
TINY = ["--width", str(TINY_WIDTH), "--batch", "4", "--image-size", "8", "--repeats", "1", "--warmup", "1"]
AMPS = {"off": None, "bf16": torch.bfloat16}


def run_script(*flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # as CI runs Triton without a GPU
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", *flags], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """The table the script writes for the tiny model, fp32 and bf16."""
    table = tmp_path_factory.mktemp("auto") / "auto_table.json"
    done = run_script("--write-auto-table", "--table", str(table), "--amp", *AMPS, *TINY)
    assert done.returncode == 0, done.stderr
    return table


@pytest.fixture
def model() -> torch.nn.Module:
    return build_model("resnet18", 10, TINY_WIDTH, MaskedBatchNorm2d)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A copy of the written table as the package's table: table(cases) -> its path, cache fresh."""
    path = tmp_path / "auto_table.json"
    monkeypatch.setattr(auto_table, "TABLE", path)
    auto_table.measured_cases.cache_clear()
    yield path
    auto_table.measured_cases.cache_clear()


def test_the_script_writes_one_case_per_amp_with_provenance(written, model):
    report = json.loads(written.read_text(encoding="utf-8"))
    assert report["device"] == "cpu"
    assert {"torch", "triton", "python"} <= set(report["versions"]) and report["date"]
    expected = {auto_table.case_key("cpu", model, SHAPE, amp) for amp in AMPS.values()}
    assert {case["key"] for case in report["cases"]} == expected
    for case in report["cases"]:
        assert case["torch_ms"] > 0 and case["fused_ms"] > 0
        assert case["winner"] == ("fused" if case["fused_ms"] < case["torch_ms"] else "torch")


def test_the_choice_follows_the_listed_winner(written, table, model):
    report = json.loads(written.read_text(encoding="utf-8"))
    # force the timings: the operator is faster in bf16 only
    forced = [{**case, "torch_ms": 2.0, "fused_ms": 1.0 if case["amp"] == "bf16" else 3.0} for case in report["cases"]]
    auto_table.write_table(forced, {name: report[name] for name in ("device", "versions", "date")})
    assert [case["winner"] for case in json.loads(table.read_text(encoding="utf-8"))["cases"]] == ["fused", "torch"]
    assert auto_table.fused_wins(model, torch.empty(SHAPE), torch.bfloat16)
    assert not auto_table.fused_wins(model, torch.empty(SHAPE), None)  # listed, PyTorch won
    assert not auto_table.fused_wins(model, torch.empty(8, 3, 8, 8), torch.bfloat16)  # not measured
    wider = build_model("resnet18", 10, 2 * TINY_WIDTH, MaskedBatchNorm2d)
    assert not auto_table.fused_wins(wider, torch.empty(SHAPE), torch.bfloat16)  # another model


def test_auto_takes_the_operator_on_a_listed_cuda_case(written, table, model, monkeypatch):
    """No GPU here: the batch is a stand-in with a CUDA device and the device's name is faked;
    everything else is the code that runs on the GPU."""
    gpu = "NVIDIA Test GPU"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpu)
    table.write_text(written.read_text(encoding="utf-8"), encoding="utf-8")  # its cpu cases stay
    faster = {"key": auto_table.case_key(gpu, model, SHAPE, torch.bfloat16), "torch_ms": 2.0, "fused_ms": 1.0}
    auto_table.write_table([faster], {"device": gpu})

    def fused_layers(shape, amp) -> list[bool]:
        choose_bn_kernels(model, "auto", SimpleNamespace(is_cuda=True, device=torch.device("cuda"), shape=shape), amp)
        return [layer.fused for _, layer in masked_batchnorm_layers(model)]

    assert all(fused_layers(torch.Size(SHAPE), torch.bfloat16))
    assert not any(fused_layers(torch.Size(SHAPE), None))  # this dtype was not measured on the GPU
    assert not any(fused_layers(torch.Size((8, 3, 8, 8)), torch.bfloat16))  # nor this shape
    choose_bn_kernels(model, "auto", torch.empty(SHAPE), torch.bfloat16)
    assert not any(layer.fused for _, layer in masked_batchnorm_layers(model))  # a CPU batch: never


def test_a_cpu_run_never_writes_the_package_table():
    done = run_script("--write-auto-table", *TINY)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "bench_masked_bn.py: error: CPU timings of the operator's PyTorch implementation do not belong in the "
        "package's table: pass --table PATH"
    )


def test_the_table_is_never_written_over_a_file_rnp_fast_did_not_make(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "data"}\n')
    done = run_script("--write-auto-table", "--table", str(mine), *TINY)
    assert done.returncode == 2 and "not made by rnp-fast" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert mine.read_text() == '{"my": "data"}\n'
