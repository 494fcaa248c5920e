"""The benchmark harness (rnp_fast.harness) and the benchmark scripts, run the way users run them."""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnp_fast.errors import UserError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# Smoke runs, not measurements: one thread each, so that other jobs on shared CI cores cannot
# oversubscribe them into minutes.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def harness():
    """The harness as the scripts import it (``from rnp_fast import harness``)."""
    return importlib.import_module("rnp_fast.harness")


def script(name: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / name), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ONE_THREAD)


def test_timing_keeps_the_warmup_apart_from_the_median(harness):
    assert harness.timing([5.0, 1.0, 3.0, 2.0], warmup=1) == {
        "warmup_runs": 1,
        "warmup_s": 5.0,
        "runs_s": [1.0, 3.0, 2.0],
        "median_s": 2.0,
    }
    calls = []
    measured = harness.measure(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and measured["warmup_runs"] == 2 and len(measured["runs_s"]) == 3
    assert measured["median_s"] == sorted(measured["runs_s"])[1]
    assert 0 <= harness.median_seconds(lambda: None, repeats=1) < 1


def test_ratios_are_over_the_base_and_empty_without_it(harness):
    assert harness.ratios({"batched": 2.0, "sequential": 3.0, "reference": 8.0}, "batched") == {
        "sequential_over_batched": 1.5,
        "reference_over_batched": 4.0,
    }
    assert harness.ratios({"sequential": 3.0}, "batched") == {}


def test_write_result_saves_the_result_with_its_provenance(harness, tmp_path, capsys):
    out = tmp_path / "results" / "result.json"
    harness.write_result({"benchmark": "test", "median_s": 1.5}, str(out), "cpu", echo=True)
    saved = json.loads(out.read_text())
    assert saved["made_by"] == "rnp-fast" and saved["benchmark"] == "test" and saved["median_s"] == 1.5
    assert saved["device"] == "cpu" and saved["versions"]["torch"] and saved["date"] and saved["command"]
    printed = capsys.readouterr()
    assert json.loads(printed.out)["median_s"] == 1.5 and f"saved {out}" in printed.err
    foreign = tmp_path / "theirs.json"
    foreign.write_text("{}")
    with pytest.raises(UserError):  # never over a file rnp-fast did not make
        harness.write_result({}, str(foreign))
    assert foreign.read_text() == "{}"


def test_run_reports_a_user_error_on_one_line_with_exit_code_2(harness, capsys):
    def main():
        raise UserError("--repeats is wrong")

    with pytest.raises(SystemExit) as exit_info:
        harness.run(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"{Path(__file__).name}: error: --repeats is wrong\n"


def test_a_script_refuses_bad_input_on_one_line():
    result = script("bench_scoring.py", "--providers", "batched,fast")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = "bench_scoring.py: error: --providers takes batched, sequential, reference; got fast"
    assert result.stderr.strip() == expected


@pytest.mark.heavy
def test_bench_eval_precision_compares_fp32_and_bf16_and_saves_its_json(tmp_path):
    out = tmp_path / "precision.json"
    result = script("bench_eval_precision.py", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert set(saved["timings"]) == {"fp32", "bf16"} and saved["fp32_over_bf16"] > 0
    assert saved["agreement"]["images"] == [599, 540]  # the demo defense's clean and poisoned test sets
    agreement = saved["agreement"]
    assert all(0 <= equal <= n for equal, n in zip(agreement["predictions_equal"], agreement["images"], strict=True))


def test_bench_layout_runs_and_saves_its_json(tmp_path):
    out = tmp_path / "layout.json"
    result = script("bench_layout.py", "--repeats", "1", "--images", "32", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved == json.loads(result.stdout) | {"made_by": "rnp-fast"}
    assert saved["device"] == "cpu" and "bench_layout.py" in saved["command"]
    for layout in ("nchw", "channels_last"):
        assert set(saved[f"eval_ms_per_image_{layout}"]) == {"32", "64", "128", "256", "512"}
        assert saved[f"train_step_ms_{layout}"] > 0


@pytest.mark.slow  # four demo defenses: 17 s; the API's parity with the CLI is tested in test_api.py
def test_bench_api_times_both_paths_and_saves_its_json(tmp_path):
    out = tmp_path / "api.json"
    flags = ["--device", "cpu", "--repeats", "1", "--unlearning-epochs", "1", "--recovering-epochs", "1"]
    result = script("bench_api.py", *flags, "--out", str(out), timeout=180)
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    for path in ("cli", "api"):
        assert saved["results"][path]["warmup_runs"] == 1 and len(saved["results"][path]["runs_s"]) == 1
    assert saved["api_over_cli"] > 0 and isinstance(saved["api_within_5_percent"], bool)


def test_run_capped_kills_the_whole_process_group_at_the_cap(tmp_path):
    from rnp_fast.harness.budget import run_capped

    pid_file = tmp_path / "grandchild.pid"
    command = ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"]  # a child that started another
    outcome = run_capped(command, cap_s=2, poll_s=0.5)
    assert outcome.timed_out and 2 <= outcome.seconds < 10
    grandchild = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    assert not grandchild.exists() or grandchild.read_text().split(") ")[1].startswith("Z")  # gone, or a zombie
    finished = run_capped([sys.executable, "-c", "raise SystemExit(3)"], cap_s=60)
    assert finished.returncode == 3 and not finished.timed_out


def test_the_budget_clock_starts_with_the_process_or_the_wrapper(monkeypatch):
    code = "import time; time.sleep(1); from rnp_fast.harness import budget; print(time.time() - budget.clock_start())"
    env = {key: value for key, value in ONE_THREAD.items() if key != "RNP_PROBE_T0"}
    spent = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)
    assert 1 <= spent < 60  # the second slept before the import counts
    from rnp_fast.harness.budget import clock_start

    monkeypatch.setenv("RNP_PROBE_T0", "1000.5")
    assert clock_start() == 1000.5
    monkeypatch.setenv("RNP_PROBE_T0", "yesterday")
    with pytest.raises(UserError, match="RNP_PROBE_T0"):
        clock_start()


@pytest.mark.heavy  # six tiny defenses and a 4-job sweep, each a fresh process: ~2 min on 2 idle cores
def test_bench_parallel_times_one_at_a_time_against_the_default(tmp_path, monkeypatch):
    out = tmp_path / "parallel.json"
    workloads = "repeats,step_rate,fused"
    result = script(
        "bench_parallel.py", "--dry-run", "--workloads", workloads, "--repeats", "1", "--out", str(out), timeout=600
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads(out.read_text())
    assert saved["machine"]["cores_available"] >= 1 and saved["cores_available"] == saved["machine"]["cores_available"]
    repeats = saved["repeats"]
    one, default = repeats["runs"]["one_at_a_time"], repeats["runs"]["default"]
    assert len(one) == len(default) == 2  # the warm-up, then the timed run
    assert all(run["processes"] == 1 for run in one) and "as asked (--jobs-per-device 1)" in one[0]["first_log_line"]
    cores = saved["machine"]["cores_available"]
    assert all(run["processes"] == min(cores, 2) for run in default)
    assert repeats["default"]["defenses_per_hour"] > 0 and repeats["one_at_a_time_over_default"] > 0
    one_thread = saved["step_rate"]["threads_1"]
    assert one_thread["fraction_of_matmul_rate"] > 0 and one_thread["step_flops"] > 1e9  # the demo's step: 6.7 GFLOP
    for stage in ("unlearn", "recover"):
        row = saved["fused"][stage]["k2"]
        assert row["fused_speedup"] > 0 and max(row["max_abs_difference_after_the_steps"].values()) < 1e-3
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench_parallel = importlib.import_module("bench_parallel")
    sweep = bench_parallel.sweep_run(tmp_path, "default", 0, dry_run=True)  # the sweep workload's path
    assert sweep["defenses"] == 4 and "job(s) at once, one torch thread each" in sweep["first_log_line"]


def test_a_scripts_out_is_checked_before_its_work(harness, tmp_path):
    """--out is vetted as the flags are read, not after minutes of measuring: the user's file is
    refused (one line, exit 2, untouched); a result of ours of the script's kind is accepted, and
    the GPU probe's parser takes its own kind."""
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": 1}')
    refused = script("readme_sweep.py", "--out", str(theirs))
    assert refused.returncode == 2 and refused.stdout == ""
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith("was not made by rnp-fast; choose another --out or remove it yourself")
    )
    assert "Traceback" not in refused.stderr and theirs.read_text() == '{"mine": 1}'
    bench, probe = tmp_path / "bench.json", tmp_path / "probe.json"
    bench.write_text('{"made_by": "rnp-fast", "kind": "bench result"}')
    probe.write_text('{"made_by": "rnp-fast", "kind": "probe result"}')
    assert harness.parser("A benchmark.").parse_args(["--out", str(bench)]).out == str(bench)
    with pytest.raises(SystemExit):
        harness.parser("A benchmark.").parse_args(["--out", str(probe)])
    assert harness.parser("The probe.", kind="probe result").parse_args(["--out", str(probe)]).out == str(probe)
