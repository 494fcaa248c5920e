"""The one benchmark harness for whole defenses and commands, used by `rnp-fast bench`, every
script in benchmarks/ and the GPU probe. The phases' micro-benchmarks (benchmarks/micro/) time
their variants with pytest-benchmark instead, which repeats, calibrates and saves them itself;
the harness keeps what pytest-benchmark does not do: whole defenses in the device's own timing
(synchronised, cold runs apart), provenance in rnp-fast's files, and the GPU probe's time budget.

It lives in the installed package because `rnp-fast bench`, an installed command, times, records
and runs its workloads with it; the scripts import it as ``from rnp_fast import harness``.

- `clock`: timing (device synchronised, warm-up apart, medians, ratios);
- `record`: results saved with their provenance, atomically, never over a file not ours;
- `budget`: the time budget from process (or wrapper) start, work in child processes killed at a cap;
- `workloads`: whole defenses as workloads (demo, synthetic CIFAR), their phases and FLOPs;
- `script`: the scripts' common flags, the demo's run, the one-line error path.
"""

from rnp_fast.harness.clock import measure, median_seconds, medians, ratios, seconds, synchronize, timing
from rnp_fast.harness.record import save, with_provenance, write_result
from rnp_fast.harness.script import demo_run, parser, positive, run

__all__ = [
    "demo_run",
    "measure",
    "median_seconds",
    "medians",
    "parser",
    "positive",
    "ratios",
    "run",
    "save",
    "seconds",
    "synchronize",
    "timing",
    "with_provenance",
    "write_result",
]
