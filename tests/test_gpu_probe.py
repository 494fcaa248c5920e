"""The GPU probe (benchmarks/gpu_probe.py) in its dry run: the same code on the CPU with tiny sizes.

One dry run of every section (started from this process, with one section made to fail on purpose)
serves the first three tests; one more makes a section's compile never end and checks that it is
killed at its cap and the next section still compiles and measures; the wrapper
(benchmarks/gpu_suite.sh) runs one cheap section as users run it.
"""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnp_fast.kernels import auto_table

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FAILING = "reference"  # made to fail; the scoring section comes after it


@pytest.fixture(scope="module")
def gpu_probe():
    """benchmarks/gpu_probe.py as the script imports it (its folder on sys.path, for this module only);
    the environment and thread count the probe sets are restored afterwards."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(BENCHMARKS))
        for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "OMP_NUM_THREADS"):
            patch.setenv(name, os.environ.get(name, ""))  # undone on exit, whatever the probe sets
        yield importlib.import_module("gpu_probe")
    torch.set_num_threads(threads)


# The whole dry run (every section, the science one's tiny fidelity defenses included) takes minutes
# on 2 cores: outside `make test`; .ci/run runs these in the GPU machine's stack (its step 2c).
DRY_RUN_IS_SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def dry_run(gpu_probe, tmp_path_factory):
    """(exit code, final JSON, the JSON read back after every save, paths) of one dry run."""
    folder = tmp_path_factory.mktemp("probe")
    out, table = folder / "probe.json", folder / "auto_table.json"
    snapshots = []
    save_json = gpu_probe.save_json

    def save_and_read_back(data, path, **options):  # options: the file's kind
        saved = save_json(data, path, **options)
        snapshots.append(json.loads(Path(path).read_text()))  # raises if not valid JSON
        return saved

    table_before = auto_table.TABLE.read_bytes() if auto_table.TABLE.is_file() else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_probe, "save_json", save_and_read_back)
        patch.setenv("RNP_PROBE_T0", repr(time.time()))  # as gpu_suite.sh does: the budget starts now
        argv = ["--dry-run", "--out", str(out), "--auto-table", str(table), "--fail-section", FAILING]
        argv += ["--budget-s", "1800"]  # shared CI cores can be slow; the budget's own tests are below
        code = gpu_probe.main(argv)
    table_after = auto_table.TABLE.read_bytes() if auto_table.TABLE.is_file() else None
    assert table_after == table_before  # never the package's table from a dry run
    return code, json.loads(out.read_text()), snapshots, table


@DRY_RUN_IS_SLOW
def test_the_dry_run_records_every_section(gpu_probe, dry_run):
    code, report, _, table = dry_run
    assert list(report["sections"]) == list(gpu_probe.SECTIONS)
    assert report["dry_run"] and report["device"] == "cpu" and report["versions"]["torch"] and report["date"]
    assert report["command"] and report["total_s"] > 0
    sections = report["sections"]
    assert {name for name, entry in sections.items() if entry["status"] != "ok"} == {FAILING}
    assert all(entry["seconds"] >= 0 and "results" in entry for entry in sections.values())
    assert sections["graphs"]["results"]["all_match"]
    kernel = sections["kernel"]["results"]
    assert kernel["failed"] == kernel["errors"] == 0 and kernel["skipped"] > 0  # the CUDA tests skip here
    steps = sections["steps"]["results"]
    assert steps["recover"]["eager_cuda_graph"] == {"status": "skipped", "reason": "no CUDA"}
    assert steps["unlearn"]["compiled"]["median_ms"] > 0 and steps["recover"]["compiled_fused_bn"]["status"] == "ok"
    saved_table = json.loads(table.read_text())
    assert steps["auto_table"]["path"] == str(table) and saved_table["cases"][0]["key"].startswith("cpu|ResNet:")
    e2e = sections["e2e"]["results"]
    assert {"eval_every_0", "eval_every_1"} <= e2e.keys() and e2e["eval_every_1"]["warm_median_seconds"]["fast"]
    assert sections["scoring"]["results"]["batched_equals_sequential"]
    assert sections["throughput"]["results"]["defenses_per_hour"] > 0
    assert set(sections["science"]["results"]["seeds"]["0"]) >= {"asr_before", "asr_after", "clean_acc_after"}
    check_fused(sections["fused"])


def check_fused(fused: dict) -> None:
    """The fused section's dry run: every model and stage timed at K = 1 and 2 (eager; CUDA graphs
    skipped without CUDA), and the fused step within its tolerance of the separate models'."""
    assert fused["status"] == "ok"
    results = fused["results"]
    for model in ("cifar_resnet18", "demo"):
        for stage in ("unlearn", "recover"):
            row = results[model][stage]
            assert row["equality"]["within_tolerance"] and row["equality"]["k"] == 4
            for k in (1, 2):
                assert row[f"k{k}"]["eager"]["speedup_fused_over_sequential"] > 0
                assert row[f"k{k}"]["cuda_graphs"] == {"status": "skipped", "reason": "no CUDA"}


@DRY_RUN_IS_SLOW
def test_a_failing_section_is_recorded_and_the_next_one_runs(dry_run):
    code, report, _, _ = dry_run
    failed = report["sections"][FAILING]
    assert code == 1 and failed["status"] == "error"
    assert failed["error"]["type"] == "RuntimeError" and "--fail-section" in failed["error"]["message"]
    assert "Traceback" in failed["error"]["traceback_tail"]
    assert report["sections"]["scoring"]["status"] == "ok"


@DRY_RUN_IS_SLOW
def test_the_json_is_valid_after_each_section(gpu_probe, dry_run):
    _, report, snapshots, _ = dry_run
    order = list(gpu_probe.SECTIONS)
    finished = [[name for name, e in s["sections"].items() if e["status"] != "running"] for s in snapshots]
    for done in finished:  # every save holds the sections finished so far, in order
        assert done == order[: len(done)]
    assert [tuple(order[:n]) for n in range(len(order) + 1)] == sorted({tuple(d) for d in finished}, key=len)
    assert snapshots[-1] == report


def test_sections_over_the_budget_are_skipped(gpu_probe, tmp_path):
    out = tmp_path / "probe.json"
    assert gpu_probe.main(["--dry-run", "--sections", "env,graphs", "--budget-s", "0.001", "--out", str(out)]) == 0
    sections = json.loads(out.read_text())["sections"]
    assert [entry["status"] for entry in sections.values()] == ["skipped", "skipped"]
    assert "--budget-s" in sections["graphs"]["reason"]


@pytest.mark.heavy
def test_a_section_stuck_compiling_is_killed_at_its_cap_and_the_next_one_compiles(gpu_probe, tmp_path, monkeypatch):
    """A compile that never ends (a backend that sleeps) in the graphs section: its process is
    killed at the cap, what it saved before is kept, and the steps section compiles and measures."""
    monkeypatch.setenv("RNP_PROBE_T0", repr(time.time()))
    out = tmp_path / "probe.json"
    argv = ["--dry-run", "--sections", "graphs,steps", "--stall-section", "graphs", "--cap-s", "graphs=20"]
    assert gpu_probe.main([*argv, "--out", str(out), "--auto-table", str(tmp_path / "table.json")]) == 0
    graphs, steps = (json.loads(out.read_text())["sections"][name] for name in ("graphs", "steps"))
    assert graphs["status"] == "timed out" and graphs["error"]["type"] == "SectionCap"
    assert graphs["results"] == {"stalled": "compiling"}  # saved before the compile began
    assert 20 <= graphs["seconds"] < 40  # killed at the cap, not waited for
    assert steps["status"] == "ok" and steps["results"]["unlearn"]["compiled"]["median_ms"] > 0


def test_the_budget_counts_from_the_wrappers_start(gpu_probe, tmp_path, monkeypatch):
    monkeypatch.setenv("RNP_PROBE_T0", repr(time.time() - 1000))  # a wrapper that started 1,000 s ago
    out = tmp_path / "probe.json"
    assert gpu_probe.main(["--dry-run", "--sections", "env", "--budget-s", "900", "--out", str(out)]) == 0
    env = json.loads(out.read_text())["sections"]["env"]
    assert env["status"] == "skipped" and "--budget-s" in env["reason"]


def test_the_first_sections_keep_their_time_on_the_gpu(gpu_probe):
    """The GPU's plan, the wrapper having spent 30 s: each first section's cap leaves the first ones
    after it their estimates, and a later section is skipped when only their time would be left."""
    from rnp_fast.harness.budget import Budget

    args = gpu_probe.parse_args(["--out", "probe.json"])
    first = [name for name, section in gpu_probe.SECTIONS.items() if section.first]
    assert first == ["env", "graphs", "kernel", "steps", "e2e"]
    spent = 30.0
    for index, name in enumerate(first):
        estimate, cap, skip = gpu_probe.plan(args, name, Budget(480, time.time() - spent))
        later = sum(gpu_probe.SECTIONS[n].estimate_s for n in first[index + 1 :])
        assert skip is None and cap <= 480 - spent - later + 1
        spent += min(estimate, cap)
    assert spent <= 480
    *_, skip = gpu_probe.plan(args, "reference", Budget(480, time.time() - spent))
    assert skip and "--budget-s" in skip


@pytest.mark.heavy  # a child process that imports torch and steps 16 tiny models: ~15 s
def test_the_fused_section_times_k_models_and_checks_them_against_separate_ones(gpu_probe, tmp_path, monkeypatch):
    monkeypatch.setenv("RNP_PROBE_T0", repr(time.time()))
    out = tmp_path / "probe.json"
    argv = ["--dry-run", "--sections", "fused", "--out", str(out), "--auto-table", str(tmp_path / "t.json")]
    assert gpu_probe.main(argv) == 0
    check_fused(json.loads(out.read_text())["sections"]["fused"])


def test_the_fused_section_only_gets_what_the_others_left(gpu_probe):
    """Last and optional on the GPU: skipped when less than its first units' time is left, and
    never capped beyond what is left."""
    from rnp_fast.harness.budget import Budget

    args = gpu_probe.parse_args(["--out", "probe.json"])
    assert list(gpu_probe.SECTIONS)[-1] == "fused" and not gpu_probe.SECTIONS["fused"].first
    *_, skip = gpu_probe.plan(args, "fused", Budget(480, time.time() - 450))
    assert skip and "--budget-s" in skip
    estimate, cap, skip = gpu_probe.plan(args, "fused", Budget(480, time.time() - 380))
    assert skip is None and cap <= 100


@pytest.mark.heavy
def test_the_wrapper_runs_the_probe_and_refuses_bad_sections(tmp_path):
    out = tmp_path / "probe.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    wrapper = ["bash", str(BENCHMARKS / "gpu_suite.sh"), "--dry-run", "--out", str(out)]
    done = subprocess.run([*wrapper, "--sections", "env"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["sections"]["env"]["results"]["matmul"]["tflops"] > 0
    bad = subprocess.run([*wrapper, "--sections", "env,gpu"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    sections = "env, graphs, kernel, steps, e2e, reference, scoring, throughput, science, fused"
    assert bad.stderr.strip() == f"gpu_probe.py: error: --sections takes {sections}; got 'env,gpu'"
