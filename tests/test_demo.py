"""`rnp-fast demo` end to end, as a new user runs it: the issue's numbers, within 3 minutes."""

from __future__ import annotations

import json

import pytest


@pytest.mark.heavy
def test_demo_removes_the_backdoor_within_three_minutes(demo_run):
    out, _, seconds = demo_run
    summary = json.loads((out / "summary.json").read_text())
    for key in ("clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "threshold", "pruned", "seconds"):
        assert key in summary
    assert summary["asr_before"] >= 0.95
    assert summary["asr_after"] <= 0.05
    assert summary["clean_acc_before"] - summary["clean_acc_after"] <= 0.03
    assert summary["threshold"] is not None and summary["pruned"] > 0  # chosen by the clean-data rule
    assert "held-out" in summary["rule"]
    assert seconds <= 180
