"""Many defenses on one CPU: one job at a time against the default (one per core), and why.

Two workloads run as users run them, in a fresh process per run:

- sweep: the README's digits sweep cut to 4 jobs (BadNets and Blend x seeds 0 and 1; ResNet-18 at
  width 0.125 trained 20 epochs, then defended), ``rnp-fast sweep`` with ``--jobs-per-device 1``
  against its default flags;
- repeats: ``rnp-fast demo --repeats 4`` with ``--jobs-per-device 1`` (the seeds one after another
  in one process, with its torch threads) against its default (one single-threaded worker per core).

The modes alternate run by run (drift hits both alike); the first run of each is the warm-up
(page cache, first imports), reported apart; medians over the rest. For each run its first log
line (how many ran at once, and why). Two more, in this process, say why the default is what it is:

- step_rate: the demo's unlearning step (batch 32) as a fraction of this CPU's fp32 matrix-product
  rate (2048^3), with one thread and with every core available: how much a job's own threads leave;
- fused: one unlearning and one recovering step of K = 1, 2, 4, 8, 16 demo models, one at a time
  against fused into one network (`rnp_fast.models.fused`), one thread: the other way to run many
  defenses at once, with the fused models' largest difference from the separate ones after the
  timed steps.

Saved with the machine's core count (affinity included), memory, CPU, versions and the command:

    python benchmarks/bench_parallel.py --out benchmarks/results/parallel_digits_cpu.json
    python benchmarks/bench_parallel.py --dry-run --repeats 1 --out /tmp/parallel.json   # minutes, no figures
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rnp_fast import harness
from rnp_fast.capacity import GIB, available_cores, available_memory
from rnp_fast.errors import UserError

MODES = {"one_at_a_time": ["--jobs-per-device", "1"], "default": []}
SWEEP = """\
name: digits-4
keep_purified: false
fixed:
  data: {{dataset: digits, ratio: 0.3, holdout: 0.3, batch_size: 32, augment: false}}
  model: {{arch: resnet18, width: 0.125}}
  train: {{epochs: {epochs}, lr: 0.05}}
  rnp: {{unlearning_lr: 0.005{rnp}}}
  trigger:
    blend: {{alpha: 0.2}}
axes:
  attack.attack: [badnets, blend]
  seed: [0, 1]
"""
SEEDS = 4
# The dry run: the same commands on tiny work (1 training epoch, 1 + 1 defense epochs, 2 seeds).
DRY_RNP = ", unlearning_epochs: 0, recovering_epochs: 1, pruning_step: 0.3"
DRY_DEFEND = ["--unlearning-epochs", "0", "--recovering-epochs", "1", "--pruning-step", "0.3"]


def rnp_fast(*args: str) -> list[str]:
    return [sys.executable, "-m", "rnp_fast", *args]


def sweep_run(workdir: Path, mode: str, number: int, dry_run: bool) -> dict:
    sweep_file = workdir / "digits-4.yaml"
    if not sweep_file.exists():
        sweep_file.write_text(SWEEP.format(epochs=1 if dry_run else 20, rnp=DRY_RNP if dry_run else ""))
    store = workdir / f"store-{mode}-{number}"
    seconds, summary = timed(rnp_fast("sweep", str(sweep_file), "--store", str(store), "--quiet", *MODES[mode]))
    if summary["done"] != summary["jobs"]:
        raise UserError(f"the sweep finished {summary['done']} of {summary['jobs']} jobs: see {store}/sweep.log")
    first_line = (store / "sweep.log").read_text().splitlines()[0]
    return {"seconds": seconds, "defenses": summary["jobs"], "first_log_line": first_line}


def repeats_run(workdir: Path, mode: str, number: int, dry_run: bool) -> dict:
    out = workdir / f"repeats-{mode}-{number}"
    if dry_run:  # the demo's defense through `defend`, whose epochs can be cut
        from rnp_fast.demo import demo_checkpoint

        demo = ["--model", demo_checkpoint(), "--width", "0.25", "--dataset", "digits", "--ratio", "0.3"]
        demo += ["--holdout", "0.3", "--batch-size", "32", "--unlearning-lr", "0.002", "--recovering-lr", "0.05"]
        command = rnp_fast("defend", *demo, *DRY_DEFEND, "--repeats", "2", "--device", "cpu")
    else:
        command = rnp_fast("demo", "--repeats", str(SEEDS), "--device", "cpu")
    seconds, _ = timed([*command, "--out", str(out), "--quiet", *MODES[mode]])
    repeats = json.loads((out / "summary.json").read_text())["repeats"]
    first_line = (out / "output.log").read_text().splitlines()[0]
    rows = [{k: v for k, v in row.items() if k != "seconds"} for row in repeats["per_seed"]]
    return {
        "seconds": seconds,
        "defenses": len(rows),
        "processes": repeats.get("processes"),
        "threads": repeats.get("threads"),
        "first_log_line": first_line,
        "per_seed": rows,
    }


def timed(command: list[str]) -> tuple[float, dict | None]:
    """Wall seconds of ``command`` (a fresh process, as a user runs it) and its JSON summary."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise UserError(f"{' '.join(command[2:])} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    try:
        return seconds, json.loads(done.stdout)
    except ValueError:
        return seconds, None


RUNS = {"sweep": sweep_run, "repeats": repeats_run}


def measure(workload: str, workdir: Path, repeats: int, dry_run: bool) -> dict:
    """The modes in turn, 1 + ``repeats`` runs each (the first the warm-up): per mode its runs,
    the median seconds and defenses per hour; the default's speed-up over one at a time."""
    runs = {mode: [] for mode in MODES}
    for number in range(1 + repeats):
        for mode in MODES:
            print(f"{workload}: {mode}, run {number + 1} of {1 + repeats}", file=sys.stderr)
            runs[mode].append(RUNS[workload](workdir, mode, number, dry_run))
    result = {"runs": runs}
    for mode, mode_runs in runs.items():
        timing = harness.timing([run["seconds"] for run in mode_runs], warmup=1)
        defenses = mode_runs[0]["defenses"]
        result[mode] = {**timing, "defenses": defenses, "defenses_per_hour": 3600 * defenses / timing["median_s"]}
    medians = {mode: result[mode]["median_s"] for mode in MODES}
    result["one_at_a_time_over_default"] = harness.ratios(medians, "default").get("one_at_a_time_over_default")
    return result


def step_rate(dry_run: bool) -> dict:
    """Per thread count (1, and every core available): the demo's unlearning step's FLOP rate
    (torch.utils.flop_counter: forward and backward) over a square fp32 matrix product's."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rnp_fast.learning import build_stage, unlearn_recipe

    job, run = harness.demo_run(device="cpu")
    images = torch.randn(32, *run.source.image_shape)
    labels = torch.randint(0, 10, (32,))
    n = 256 if dry_run else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    threads_before, result = torch.get_num_threads(), {"matmul_n": n, "batch": 32}
    try:
        for threads in sorted({1, available_cores()}):
            torch.set_num_threads(threads)
            step = build_stage(unlearn_recipe(job.rnp), run.new_model(), run.engine, 32).step
            with FlopCounterMode(display=False) as counter:
                step(images, labels)
            flops = counter.get_total_flops()
            step_s = harness.median_seconds(lambda s=step: s(images, labels), 3 if dry_run else 20, warmup=2)
            matmul_s = harness.median_seconds(lambda: a @ b, 3 if dry_run else 10, warmup=2)
            rates = {"step_gflops": flops / step_s / 1e9, "matmul_gflops": 2 * n**3 / matmul_s / 1e9}
            result[f"threads_{threads}"] = {
                "step_flops": flops,
                "step_ms": step_s * 1e3,
                **rates,
                "fraction_of_matmul_rate": rates["step_gflops"] / rates["matmul_gflops"],
            }
    finally:
        torch.set_num_threads(threads_before)
    return result


def fused(dry_run: bool) -> dict:
    """K demo models' steps one at a time and fused, one thread (as a job runs), K = 1..16."""
    import torch

    threads_before, result = torch.get_num_threads(), {"width": 0.25, "batch": 32, "threads": 1}
    torch.set_num_threads(1)
    try:
        for stage in ("unlearn", "recover"):
            result[stage] = {}
            for k in (1, 2) if dry_run else (1, 2, 4, 8, 16):
                print(f"fused: {stage} K={k}", file=sys.stderr)
                result[stage][f"k{k}"] = fused_case(stage, k, *((1, 1) if dry_run else (5, 2)))
    finally:
        torch.set_num_threads(threads_before)
    return result


def fused_case(stage: str, k: int, rounds: int, warmup: int) -> dict:
    import torch

    from rnp_fast.engine import EngineSettings
    from rnp_fast.models.fused import step_array

    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(32, 3, 32, 32, generator=generator) for _ in range(k)]
    labels = [torch.randint(0, 10, (32,), generator=generator) for _ in range(k)]
    array = step_array(stage, k, "resnet18", 0.25, EngineSettings(), 32, "cpu")
    one = harness.measure(lambda: array.step_separately(images, labels), rounds, warmup=warmup)
    together = harness.measure(lambda: array.step_fused(images, labels), rounds, warmup=warmup)
    return {
        "one_at_a_time": one,
        "fused": together,
        "fused_speedup": one["median_s"] / together["median_s"],
        "steps": rounds + warmup,
        "max_abs_difference_after_the_steps": array.differences(),
    }


WORKLOADS = {
    "sweep": lambda workdir, args: measure("sweep", workdir, args.repeats, args.dry_run),
    "repeats": lambda workdir, args: measure("repeats", workdir, args.repeats, args.dry_run),
    "step_rate": lambda workdir, args: step_rate(args.dry_run),
    "fused": lambda workdir, args: fused(args.dry_run),
}


def main() -> None:
    parser = harness.parser(__doc__, repeats=2)
    parser.add_argument("--dry-run", action="store_true", help="the same commands on tiny work (checks, not figures)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma separated, of: {', '.join(WORKLOADS)}")
    args = parser.parse_args()
    workloads = [name for name in args.workloads.split(",") if name]
    if not workloads or set(workloads) - set(WORKLOADS):
        raise UserError(f"--workloads takes {', '.join(WORKLOADS)}; got {args.workloads!r}")
    memory = available_memory()
    report = {
        "benchmark": "defenses per hour: one job at a time vs the default (one per core)",
        "dry_run": args.dry_run,
        "machine": {"cores_available": available_cores(), "memory_available_gib": memory / GIB if memory else None},
        "modes": {mode: " ".join(flags) or "(default flags)" for mode, flags in MODES.items()},
    }
    with tempfile.TemporaryDirectory(prefix="rnp-bench-parallel-") as tmp:
        for workload in workloads:
            report[workload] = WORKLOADS[workload](Path(tmp), args)
    harness.write_result(report, args.out, "cpu", echo=not args.out)


if __name__ == "__main__":
    harness.run(main)
