"""`rnp-fast demo` end to end, as a new user runs it: the issue's numbers, within 3 minutes."""

from __future__ import annotations

import pytest
from tests_support import strict_json_files


@pytest.mark.heavy
def test_demo_removes_the_backdoor_within_three_minutes(demo_run):
    out, _, seconds = demo_run
    files = strict_json_files(out)  # every JSON the demo writes parses strictly (no NaN, no Infinity)
    summary = files["summary.json"]
    for key in ("clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "threshold", "pruned", "seconds"):
        assert key in summary
    counted = ["clean_acc", "clean_acc_full", "asr"]
    for name in [f"{figure}_{when}" for figure in counted for when in ("before", "after")] + ["clean_acc_full_drop"]:
        lo, hi = summary[f"{name}_ci95"]
        assert summary[f"{name}_n"] > 0 and lo <= summary[name] <= hi, name
    assert summary["clean_acc_full_before_n"] == 599 and summary["asr_after_n"] == summary["clean_acc_before_n"]
    verdict = summary["verdict"]
    assert verdict["success"] == (not verdict["failed"])
    assert set(verdict["failed"]) <= {"asr_after", "clean_acc_full_drop"}
    assert f"verdict: {verdict['text']}" in (out / "output.log").read_text()
    assert summary["threshold"] in [i * 5 / 100 for i in range(19)]  # a decimal, never 0.15000000000000002
    assert summary["asr_before"] >= 0.95
    assert summary["asr_after"] <= 0.05
    assert summary["clean_acc_before"] - summary["clean_acc_after"] <= 0.03
    assert summary["threshold"] is not None and summary["pruned"] > 0  # chosen by the clean-data rule
    assert "held-out" in summary["rule"]
    assert seconds <= 180
