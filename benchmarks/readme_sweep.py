"""The README's example sweep (its `digits-attacks.yaml`, read from README.md as written), run and
reported as a user runs it; the report's table saved with provenance for docs/sweeps.md.

    python benchmarks/readme_sweep.py --out benchmarks/results/readme_sweep_cpu.json   # ~15 min on 2 idle cores
    python benchmarks/readme_sweep.py --store runs/digits --out ...   # reuse a store: finished jobs are skipped
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rnp_fast import harness
from rnp_fast.errors import UserError

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_yaml() -> str:
    """The README's sweep file, as a user copies it."""
    match = re.search(r"```yaml\n(# digits-attacks\.yaml\n.*?)```", README.read_text(encoding="utf-8"), re.S)
    if match is None:
        sys.exit("readme_sweep.py: README.md has no ```yaml block starting '# digits-attacks.yaml'")
    return match.group(1)


def rnp_fast(*args: str) -> None:
    """``rnp-fast ARGS`` in a child process; its failure is one line here (its own error printed above)."""
    code = subprocess.run([sys.executable, "-m", "rnp_fast", *args]).returncode
    if code != 0:
        raise UserError(f"rnp-fast {args[0]} exited {code} (its error is printed above)")


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--store", help="the sweep's store (default: a temporary folder)")
    args = parser.parse_args()
    yaml = readme_yaml()
    with tempfile.TemporaryDirectory(prefix="rnp-readme-sweep-") as workdir:
        spec = Path(workdir) / "digits-attacks.yaml"
        spec.write_text(yaml)
        store = Path(args.store or Path(workdir) / "store")
        started = time.perf_counter()
        rnp_fast("sweep", str(spec), "--store", str(store), "--quiet")
        seconds = time.perf_counter() - started
        rnp_fast("report", str(store))
        table = (store / "report" / "results.md").read_text().splitlines()
        csv = (store / "report" / "results.csv").read_text().splitlines()
    result = {
        "sweep_file": yaml,
        "store_reused": args.store is not None,  # then sweep_seconds is the resume's, the jobs' times are the table's
        "sweep_seconds": round(seconds, 1),
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "results_md": table,
        "results_csv": csv,
    }
    harness.write_result(result, args.out, "cpu", echo=not args.out)


if __name__ == "__main__":
    harness.run(main)
