"""`rnp-fast bench` and the harness's defense workloads: result, table, JSON (timings are not asserted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rnp_fast.bench import format_table, run_bench, save_result
from rnp_fast.cli import main
from rnp_fast.config import BenchConfig
from rnp_fast.errors import UserError
from rnp_fast.harness.workloads import PHASES, phase_seconds, speedups


def fake_medians(reference: float, fast: float) -> dict:
    return {"reference": dict.fromkeys(PHASES, reference), "fast": dict.fromkeys(PHASES, fast)}


def test_speedups_are_reference_over_fast():
    assert speedups(fake_medians(3.0, 1.5)) == dict.fromkeys(PHASES, 2.0)
    assert speedups({"fast": dict.fromkeys(PHASES, 1.0)}) is None


def test_phases_add_up_to_the_total():
    timings = {"data": 1.0, "unlearn": 2.0, "recover": 3.0, "epoch_eval": 0.5, "prune_eval": 1.5, "total": 9.0}
    phases = phase_seconds({"timings": timings})
    assert phases["evaluation"] == 2.0 and phases["other"] == pytest.approx(1.0)
    assert sum(phases[p] for p in PHASES if p != "total") == pytest.approx(phases["total"])


def test_one_fast_run_gives_a_complete_result(tmp_path):
    config = BenchConfig(device="cpu", repeats=1, unlearning_epochs=1, recovering_epochs=1, modes="fast")
    result = run_bench(config, progress=lambda line: None)
    assert set(result["warm_median_seconds"]["fast"]) == set(PHASES)
    assert result["cold_seconds"]["fast"]["total"] > 0
    assert result["flops"]["forward_flops_per_image"] > 0
    for key in ("device", "versions", "date", "command"):
        assert result[key]
    table = format_table(result)
    assert "| recover |" in table and "fast (s)" in table
    path = save_result(result, str(tmp_path / "results" / "bench.json"))
    assert json.loads(path.read_text())["config"]["modes"] == "fast"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--repeats", "0"], "--repeats must be in 1..10,000"), (["--workload", "imagenet"], "--workload must be one of")],
)
def test_bad_bench_flags(flags, message, capsys):
    assert main(["bench", *flags]) == 2
    assert message in capsys.readouterr().err


def test_bench_config_rejects_unknown_modes():
    with pytest.raises(UserError, match="--modes takes reference and/or fast"):
        BenchConfig(modes="fast,turbo")


def test_modes_agree_compares_the_last_runs_masks_and_tables(tmp_path):
    from rnp_fast.bench import modes_agree

    masks = Path(__file__).parent / "data" / "reference" / "mask_values.txt"
    for mode, table in (("reference", "No \t Layer\n0 \t a\n"), ("fast", "No \t Layer\n0 \t b\n")):
        run = tmp_path / f"{mode}-3"
        run.mkdir()
        shutil.copy(masks, run / "mask_values.txt")
        (run / "pruning_by_threshold.txt").write_text(table)
    assert modes_agree(tmp_path, 3) == {"max_mask_difference": 0.0, "pruning_tables_identical": False}
