"""The demo runs that the README and docs/ quote, remade as a user runs them and saved with provenance.

`single` runs `rnp-fast demo --device cpu` (seed 0) and saves its summary.json and config.json, the
lines it printed (timestamps dropped) and its wall time; `repeats` runs `rnp-fast demo --device cpu
--repeats 10` over data seeds and over order draws (`--repeat-over order`) and saves each run's
summary.json the same way. tests/test_claims.py renders every quoted demo figure from these files;
its heavy test reruns the single demo and compares. CPU runs are deterministic, so only the times
need an idle machine (the load average before and after is saved beside them).

    python benchmarks/demo_runs.py single --out benchmarks/results/demo_cpu.json            # ~1 min idle, 2 cores
    python benchmarks/demo_runs.py repeats --out benchmarks/results/demo_repeats_cpu.json   # ~13 min idle
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rnp_fast import harness

RUNS = {
    "single": {"single": []},
    "repeats": {"data": ["--repeats", "10"], "order": ["--repeats", "10", "--repeat-over", "order"]},
}
TIMESTAMP = re.compile(r"^\[\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\] - ")


def printed_lines(text: str) -> list[str]:
    """What the command printed, one entry a line, without the log's timestamps."""
    return [TIMESTAMP.sub("", line) for line in text.splitlines()]


def run_demo(extra: list[str], workdir: Path) -> dict:
    """One `rnp-fast demo` in a child process, as a user runs it; its files and what it printed."""
    out = workdir / "run"
    command = [sys.executable, "-m", "rnp_fast", "demo", "--out", str(out), "--device", "cpu", *extra]
    load_before, started = os.getloadavg(), time.perf_counter()
    measured = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"demo_runs.py: {' '.join(command)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    record = {
        "command": " ".join(["rnp-fast", "demo", "--out", "DIR", "--device", "cpu", *extra]),
        "measured": measured,
        "wall_seconds": round(wall, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "printed": printed_lines(result.stdout + result.stderr),
    }
    if "repeats" in summary:  # a --repeats run's summary holds its config already
        return {**record, **summary}
    return {**record, "summary": summary, "config": json.loads((out / "config.json").read_text())}


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("which", choices=sorted(RUNS), help="the single demo, or the two --repeats runs")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="rnp-demo-runs-") as workdir:
        for name, extra in RUNS[args.which].items():
            print(f"demo_runs.py: {name} ...", file=sys.stderr)
            runs[name] = run_demo(extra, Path(workdir) / name)
    harness.write_result({"runs": runs}, args.out, "cpu", echo=not args.out)


if __name__ == "__main__":
    harness.run(main)
