"""`rnp-fast bench`: the reference mode and the fast mode on identical work, phase by phase.

Both modes run the whole defense (`defense.run_defense`) with the same model, data, a fixed number
of unlearning epochs (early stop off, so both do the same number of steps), the same recovering
epochs, per-epoch evaluation of both test sets when asked (the reference always does it), and the
same pruning thresholds. Each mode first runs once untimed-for-the-median: that run is reported
as "cold" (it pays for compilation, caches and allocator growth); then ``repeats`` runs,
interleaved between the modes so drift hits both alike, give the medians ("warm") and the ratios.

Phases come from the run's own timings: data (loading, test-set poisoning, model load), unlearn
and recover (training steps, including the time waiting for batches), evaluation (per-epoch
evaluations, the pruning sweep, and the model before and after), other (writing outputs: masks,
tables, plot, purified model), total (the whole run).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from rnp_fast.config import BenchConfig
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.outputs import save_json
from rnp_fast.provenance import provenance

PHASES = ("data", "unlearn", "recover", "evaluation", "other", "total")
# Dense bf16 tensor-core peaks (FLOP/s) for the fraction-of-peak column; unknown devices get none.
BF16_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def demo_workload(config: BenchConfig, out: str):
    from rnp_fast.config import EngineConfig
    from rnp_fast.demo import demo_job

    job = demo_job(out, EngineConfig(device=config.device, quiet=True))
    return with_bench_settings(job, config, unlearning_epochs=5, recovering_epochs=job.rnp.recovering_epochs)


def cifar_workload(config: BenchConfig, out: str):
    from rnp_fast.synthetic import synthetic_cifar_job

    job = synthetic_cifar_job(out, device=config.device)
    return with_bench_settings(job, config, unlearning_epochs=13, recovering_epochs=20)


WORKLOADS = {"demo": demo_workload, "cifar": cifar_workload}


def with_bench_settings(job, config: BenchConfig, unlearning_epochs: int, recovering_epochs: int):
    """Fixed epochs (early stop off), the asked per-epoch evaluation, nothing on the terminal."""
    epochs = config.unlearning_epochs or unlearning_epochs
    rnp = replace(
        job.rnp,
        unlearning_epochs=epochs - 1,  # the flag counts the last epoch index (0..N)
        early_stop=False,
        recovering_epochs=config.recovering_epochs or recovering_epochs,
    )
    engine = replace(job.engine, eval_every=config.eval_every, quiet=True)
    return replace(job, rnp=rnp, engine=engine)


def phase_seconds(summary: dict) -> dict[str, float]:
    timings = summary["timings"]
    phases = {
        "data": timings.get("data", 0.0),
        "unlearn": timings.get("unlearn", 0.0),
        "recover": timings.get("recover", 0.0),
        "evaluation": sum(timings.get(name, 0.0) for name in ("epoch_eval", "prune_eval", "model_eval")),
    }
    # writing outputs (masks, tables, plot, purified model) and choosing the threshold
    phases["other"] = max(0.0, timings["total"] - sum(phases.values()))
    return {**phases, "total": timings["total"]}


def run_once(config: BenchConfig, mode: str, workdir: Path, number: int) -> dict[str, float]:
    from rnp_fast.defense import run_defense

    job = WORKLOADS[config.workload](config, str(workdir / f"{mode}-{number}"))
    job = replace(job, engine=replace(job.engine, mode=mode))
    return phase_seconds(run_defense(job, reuse=True))  # a benchmark repeats: compiling pays back


def run_bench(config: BenchConfig, progress=print) -> dict:
    device = resolve_device(config.device)
    modes = config.mode_list
    cold: dict[str, dict[str, float]] = {}
    warm: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="rnp-bench-") as workdir:
        if config.fresh_compile_cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(workdir) / "inductor-cache")
        for mode in modes:
            progress(f"{mode}: cold run")
            cold[mode] = run_once(config, mode, Path(workdir), 0)
        for number in range(1, config.repeats + 1):
            for mode in modes:
                progress(f"{mode}: run {number}/{config.repeats}")
                warm[mode].append(run_once(config, mode, Path(workdir), number))
        work = workload_flops(config, Path(workdir))
        agreement = modes_agree(Path(workdir), config.repeats) if len(modes) == 2 else None
    medians = {mode: {p: statistics.median(run[p] for run in warm[mode]) for p in PHASES} for mode in modes}
    return {
        "benchmark": "rnp-fast bench",
        "config": asdict(config),
        **provenance(device, " ".join(["rnp-fast", *sys.argv[1:]])),
        "cold_seconds": cold,
        "warm_median_seconds": medians,
        "warm_runs_seconds": warm,
        "speedup_reference_over_fast": speedups(medians),
        "modes_agree": agreement,
        "flops": work,
        "achieved": achieved(work, medians, describe_device(device)),
    }


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


def speedups(medians: dict) -> dict[str, float] | None:
    if not {"reference", "fast"} <= medians.keys():
        return None
    return {p: medians["reference"][p] / max(medians["fast"][p], 1e-9) for p in PHASES}


def workload_flops(config: BenchConfig, workdir: Path) -> dict:
    """Model FLOPs of the workload (torch.utils.flop_counter, one forward per image = F):
    unlearning 3F per image-step (forward, input and weight gradients), recovering 2F (forward and
    input gradients: the frozen weights get none; the mask gradients are per channel, negligible),
    evaluation F per scored image (an upper bound for all2one: every test image twice)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rnp_fast.data import defense_data
    from rnp_fast.resolved import resolve_run

    job = WORKLOADS[config.workload](config, str(workdir / "flops"))
    run = resolve_run(job.model, job.data, job.attack, replace(job.engine, device="cpu"))
    model = run.new_model().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *run.source.image_shape))
    per_image = counter.get_total_flops()
    train_images = len(defense_data(run.source, job.data).train)
    test_images = len(run.source.test.labels) * 2
    epochs = job.rnp.unlearning_epochs + 1 + job.rnp.recovering_epochs
    evaluations = (epochs // config.eval_every if config.eval_every else 0) + 19 + 2
    return {
        "forward_flops_per_image": per_image,
        "unlearn": 3 * per_image * train_images * (job.rnp.unlearning_epochs + 1),
        "recover": 2 * per_image * train_images * job.rnp.recovering_epochs,
        "evaluation_upper_bound": per_image * test_images * evaluations,
    }


def achieved(work: dict, medians: dict, device_name: str) -> dict | None:
    if "fast" not in medians:
        return None
    seconds = medians["fast"]["unlearn"] + medians["fast"]["recover"]
    tflops = (work["unlearn"] + work["recover"]) / max(seconds, 1e-9) / 1e12
    peak = next((value for key, value in BF16_PEAK_FLOPS.items() if key in device_name), None)
    return {"train_tflops": tflops, "fraction_of_bf16_peak": tflops * 1e12 / peak if peak else None}


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
    return save_json(result, path)
