"""Fidelity in distribution: does a fast setting that changes the numerics give the same science?

The fast mode's settings that change arithmetic (bf16 autocast, channels_last training, compiled
steps) change the masks by design, so equality with the reference can only be shown over seeds.
This runs the demo defense on the same defense-data seeds once per setting (`defense.compute_defense`,
the product's path, the run resolved once per setting) and reports, per setting against the
baseline: the distributions of ASR after, clean accuracy after (non-target and full test) and the
pruned count; the Spearman rank correlation of every seed's masks with the baseline's masks of the
same seed; a paired bootstrap 95 % interval of the mean difference per metric; and a verdict line.

The baseline is the fast mode's fp32 eager NCHW path on the CPU (the default CPU settings), which
tests/test_pipeline.py::test_fast_and_reference_modes_agree shows gives the same masks and pruning
tables as ``--mode reference``; on CUDA the baseline is ``--mode reference`` itself.

    python benchmarks/bench_fidelity.py --seeds 10 --out benchmarks/results/fidelity_demo_cpu.json
    python benchmarks/bench_fidelity.py --dry-run        # tiny: 2 seeds, 1 + 1 epochs (CI)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import replace

import torch

from rnp_fast import harness
from rnp_fast.config import EngineConfig

METRICS = ("asr_after", "clean_acc_after", "clean_acc_full_after", "pruned")
CPU_SETTINGS = {
    "channels_last": {"channels_last": True},
    "bf16": {"amp": "bf16"},
    "compiled": {"compile": True},
}
CUDA_SETTINGS = {"fast defaults": {}}
DRY_RUN_RNP = {"unlearning_epochs": 1, "recovering_epochs": 1, "pruning_step": 0.3}
BOOTSTRAP_DRAWS = 2000


def amx_bf16() -> bool:
    from rnp_fast.device import cpuinfo

    return "amx_bf16" in (cpuinfo("flags") or "")


def settings_for(device: str) -> dict[str, dict]:
    """The settings that change numerics on this device (bf16 only where the CPU has AMX bf16)."""
    if device.startswith("cuda"):
        return dict(CUDA_SETTINGS)
    return {name: fields for name, fields in CPU_SETTINGS.items() if name != "bf16" or amx_bf16()}


def baseline_engine(device: str) -> dict:
    return {"mode": "reference"} if device.startswith("cuda") else {}


def defend_setting(device: str, engine_fields: dict, seeds: list[int], rnp_overrides: dict) -> list[dict]:
    """The demo defense on every seed with these engine fields: per seed the summary's metrics and masks."""
    from rnp_fast.defense import compute_defense, load_inputs
    from rnp_fast.demo import demo_job
    from rnp_fast.resolved import resolve_run

    job = demo_job(None, EngineConfig(device=device, quiet=True, **engine_fields))
    job = replace(job, rnp=replace(job.rnp, **rnp_overrides))
    run = resolve_run(job.model, job.data, job.attack, job.engine, reuse=True)
    inputs = load_inputs(job, run)
    results = []
    for seed in seeds:
        defense = compute_defense(job, run, inputs, seed=seed)
        summary = defense.summary()
        record = {"seed": seed, **{key: summary[key] for key in METRICS}, "seconds": summary["seconds"]}
        record["masks"] = [channel.value for channel in defense.channels]
        results.append(record)
        print(
            f"  seed {seed}: ASR {record['asr_after']:.3f}, clean {record['clean_acc_full_after']:.3f}, "
            f"{record['pruned']} pruned",
            file=sys.stderr,
            flush=True,
        )
    return results


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denominator if denominator else float("nan")


def average_ranks(values: list[float]) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    for value in torch.unique(x):  # ties share their mean rank
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def bootstrap_interval(differences: list[float], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> list[float]:
    """95 % percentile bootstrap interval of the mean of paired differences."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(differences, k=len(differences))) for _ in range(draws))
    return [means[int(0.025 * draws)], means[int(0.975 * draws) - 1]]


def describe(values: list[float]) -> dict:
    return {
        "values": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def compare(baseline: list[dict], other: list[dict]) -> dict:
    """Per metric: both distributions, the paired differences' bootstrap interval; mask correlations."""
    seeds = len(baseline)
    comparison: dict = {"metrics": {}, "seeds": seeds}
    same = True
    for metric in METRICS:
        base = [float(r[metric]) for r in baseline]
        mine = [float(r[metric]) for r in other]
        differences = [m - b for m, b in zip(mine, base, strict=True)]
        interval = bootstrap_interval(differences)
        contains_zero = interval[0] <= 0.0 <= interval[1]
        same &= contains_zero
        comparison["metrics"][metric] = {
            "baseline": describe(base),
            "setting": describe(mine),
            "mean_difference": statistics.fmean(differences),
            "bootstrap_95": interval,
            "interval_contains_0": contains_zero,
        }
    correlations = [spearman(b["masks"], o["masks"]) for b, o in zip(baseline, other, strict=True)]
    identical = all(b["masks"] == o["masks"] for b, o in zip(baseline, other, strict=True))
    comparison["mask_spearman"] = describe(correlations)
    comparison["masks_identical"] = identical
    comparison["verdict"] = verdict(identical, same, seeds, comparison["mask_spearman"]["mean"])
    return comparison


def verdict(identical: bool, same: bool, seeds: int, rho: float) -> str:
    if identical:
        return f"identical masks at {seeds} seeds (the setting does not change this run's numerics)"
    if same:
        return (
            f"same distribution at {seeds} seeds: every paired 95 % interval contains 0 "
            f"(masks' rank correlation {rho:.3f}; {seeds} seeds detect only large shifts)"
        )
    return f"DIFFERENT at {seeds} seeds: a paired 95 % interval excludes 0 (masks' rank correlation {rho:.3f})"


def fidelity(
    device: str, seeds: list[int], settings: dict[str, dict] | None = None, dry_run: bool = False, on_setting=None
) -> dict:
    """The whole comparison (the GPU probe's science section calls this); masks are left out of the
    result. ``on_setting(result)``: called after each setting, so a stopped run keeps what it measured."""
    rnp_overrides = DRY_RUN_RNP if dry_run else {}
    if settings is None:
        settings = settings_for(device)
        settings = dict(list(settings.items())[:1]) if dry_run else settings  # a dry run checks the code, once
    print(f"baseline {baseline_engine(device) or 'fp32 eager'}", file=sys.stderr, flush=True)
    baseline = defend_setting(device, baseline_engine(device), seeds, rnp_overrides)
    result = {"device": device, "seeds": seeds, "dry_run": dry_run, "baseline": baseline_engine(device), "settings": {}}
    for name, fields in settings.items():
        print(f"setting {name}: {fields}", file=sys.stderr, flush=True)
        runs = defend_setting(device, fields, seeds, rnp_overrides)
        result["settings"][name] = {"engine": fields, **compare(baseline, runs), "seconds": sum_seconds(runs)}
        result["baseline_seconds"] = sum_seconds(baseline)
        if on_setting is not None:
            on_setting(result)
    return result


def sum_seconds(runs: list[dict]) -> float:
    return sum(r["seconds"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=10, help="defense-data seeds 0..N-1")
    parser.add_argument("--setting", action="append", help="only these settings (default: all for the device)")
    parser.add_argument("--dry-run", action="store_true", help="2 seeds, 1 + 1 epochs: checks the script only")
    parser.add_argument("--out", help="save the result as JSON here")
    args = parser.parse_args()
    seeds = list(range(2 if args.dry_run else args.seeds))
    settings = {name: settings_for(args.device)[name] for name in args.setting} if args.setting else None

    def save(result: dict) -> None:  # provenance first, atomically, never over a file rnp-fast did not make
        if args.out:
            harness.save(harness.with_provenance(result, args.device), args.out)

    result = fidelity(args.device, seeds, settings, args.dry_run, on_setting=save)
    for name, entry in result["settings"].items():
        print(f"{name}: {entry['verdict']}")


if __name__ == "__main__":
    harness.run(main)
