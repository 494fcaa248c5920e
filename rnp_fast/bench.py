"""`rnp-fast bench`: the reference mode and the fast mode on identical work, phase by phase.

Both modes run the whole defense on the same workload (`rnp_fast.harness.workloads`: model,
data, fixed epochs with early stop off, per-epoch evaluation of both test sets when asked (the
reference always does it), the same pruning thresholds). Each mode first runs once untimed-for-
the-median: that run is reported as "cold" (it pays for compilation, caches and allocator growth);
then ``repeats`` runs, interleaved between the modes so drift hits both alike, give the medians
("warm") and the ratios.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from rnp_fast.config import BenchConfig
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.harness.clock import medians
from rnp_fast.harness.record import save, with_provenance
from rnp_fast.harness.workloads import PHASES, achieved, speedups, timed_defenses, workload_flops


def run_bench(config: BenchConfig, progress=print) -> dict:
    device = resolve_device(config.device)
    modes = config.mode_list
    with tempfile.TemporaryDirectory(prefix="rnp-bench-") as workdir:
        if config.fresh_compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(workdir) / "inductor-cache")
        cold, warm = timed_defenses(config, Path(workdir), progress)
        work = workload_flops(config, Path(workdir))
        agreement = modes_agree(Path(workdir), config.repeats) if len(modes) == 2 else None
    warm_medians = {mode: medians(warm[mode]) for mode in modes}
    result = {
        "benchmark": "rnp-fast bench",
        "config": asdict(config),
        "cold_seconds": cold,
        "warm_median_seconds": warm_medians,
        "warm_runs_seconds": warm,
        "speedup_reference_over_fast": speedups(warm_medians),
        "modes_agree": agreement,
        "flops": work,
        "achieved": achieved(work, warm_medians["fast"], describe_device(device)) if "fast" in modes else None,
    }
    return with_provenance(result, device, " ".join(["rnp-fast", *sys.argv[1:]]))


def modes_agree(workdir: Path, number: int) -> dict:
    """Whether the last runs of both modes gave the same science: the largest mask difference,
    and whether the pruning tables are identical."""
    from rnp_fast.report import read_mask_file

    runs = {mode: workdir / f"{mode}-{number}" for mode in ("reference", "fast")}
    masks = {mode: read_mask_file(run / "mask_values.txt") for mode, run in runs.items()}
    tables = {mode: (run / "pruning_by_threshold.txt").read_text() for mode, run in runs.items()}
    pairs = zip(masks["reference"], masks["fast"], strict=True)
    return {
        "max_mask_difference": max(abs(a.value - b.value) for a, b in pairs),
        "pruning_tables_identical": tables["reference"] == tables["fast"],
    }


def format_table(result: dict) -> str:
    medians = result["warm_median_seconds"]
    modes = list(medians)
    ratios = result["speedup_reference_over_fast"]
    header = ["phase", *(f"{m} (s)" for m in modes), *(["speed-up"] if ratios else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for phase in PHASES:
        cells = [phase, *(f"{medians[m][phase]:.3f}" for m in modes)]
        if ratios:
            cells.append(f"{ratios[phase]:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    cold = ", ".join(f"{m} {result['cold_seconds'][m]['total']:.2f} s" for m in modes)
    lines.append("")
    lines.append(
        f"{result['device']}; medians of {result['config']['repeats']} warm runs (in-process: compiled code and "
        f"caches from the cold run are reused); cold (first) runs: {cold}"
    )
    if result.get("modes_agree"):
        agree = result["modes_agree"]
        same = "identical" if agree["pruning_tables_identical"] else "DIFFERENT"
        lines.append(f"masks differ by at most {agree['max_mask_difference']:.2g}; pruning tables {same}")
    if result.get("achieved"):
        frac = result["achieved"]["fraction_of_bf16_peak"]
        peak = f" ({frac:.1%} of bf16 peak)" if frac else ""
        lines.append(f"fast mode training throughput: {result['achieved']['train_tflops']:.3f} TFLOP/s{peak}")
    return "\n".join(lines)


def save_result(result: dict, path: str) -> Path:
    """Save a result as JSON (atomically, and only over a result file of ours)."""
    return save(result, path)
