"""The Python API against the CLI on the same work: the demo defense, end to end, both ways.

"cli" runs `rnp-fast defend`'s code (`run_defense` on the demo job: the bundled BadNets ResNet-18
on the digits set); "api" does what a Python caller does for the same defense: loads the same
checkpoint and dataset, poisons the same test set, calls ``rnp_fast.defend`` and saves the run
directory. Both read, compute and write the same things, so their medians should agree within
noise (the issue's bound: the API within 5 % of the CLI). The two alternate within every repeat,
so drift on a shared machine falls on both; the first round is reported apart (warm-up).

    python benchmarks/bench_api.py --device cuda --out benchmarks/results/api_vs_cli_h200.json
    python benchmarks/bench_api.py --device cpu --repeats 1 --unlearning-epochs 0 --recovering-epochs 1  # smoke run
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

import rnp_fast
from rnp_fast import harness
from rnp_fast.attacks import build_trigger
from rnp_fast.checkpoint import load_model_weights
from rnp_fast.config import EngineConfig
from rnp_fast.defense import DefendJob, run_defense
from rnp_fast.demo import demo_job
from rnp_fast.device import resolve_device
from rnp_fast.evaluation.test_sets import build_test_sets
from rnp_fast.loaders.sources import load_source
from rnp_fast.models import build_model

BOUND = 1.05  # the API's median at most 5 % above the CLI's


def benchmark_job(args) -> DefendJob:
    """The demo's defense, with the epochs asked for (0: the demo's own)."""
    job = demo_job("", EngineConfig(device=args.device, quiet=True))
    epochs = {"unlearning_epochs": args.unlearning_epochs, "recovering_epochs": args.recovering_epochs}
    return replace(job, rnp=replace(job.rnp, **{k: v for k, v in epochs.items() if v}))


def cli_path(job: DefendJob, out: Path) -> None:
    run_defense(replace(job, out=str(out)))


def api_path(job: DefendJob, out: Path) -> None:
    """What a Python caller writes for the same defense (see the README's Python API)."""
    source = load_source(job.data.dataset)
    model = build_model(job.model.arch, source.num_classes, job.model.width)
    load_model_weights(model, job.model_path, job.model.arch)
    attack = job.attack
    channels, _, size = source.image_shape
    trigger = build_trigger(attack.attack, image_size=size, channels=channels, **attack.trigger_params())
    tests = build_test_sets(
        source.test, trigger, attack.label_mode, attack.target, source.num_classes, source.mean, source.std, "cpu"
    )
    result = rnp_fast.defend(
        model,
        defense=(source.train.images, source.train.labels),
        mean=source.mean,
        std=source.std,
        test=(source.test.images, source.test.labels),
        poisoned=(tests.poisoned.images, tests.poison_targets, tests.poisoned.labels),
        rnp=job.rnp,
        data=job.data,  # the same share of the same training split, batch size and seed
        engine=job.engine,
    )
    result.save(out)


def alternating(paths: dict, job: DefendJob, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of every path in every round, the paths taking turns, each into a fresh directory."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as folder:
        for number in range(rounds):
            for name, path in paths.items():
                out = Path(folder) / f"{name}-{number}"
                samples[name].append(harness.seconds(lambda path=path, out=out: path(job, out), device))
                print(f"round {number}: {name} {samples[name][-1]:.2f} s", file=sys.stderr)
    return samples


def main() -> None:
    parser = harness.parser(__doc__, device="auto", repeats=5)
    parser.add_argument("--unlearning-epochs", type=int, default=0, help="default: the demo's")
    parser.add_argument("--recovering-epochs", type=int, default=0, help="default: the demo's")
    args = parser.parse_args()
    job = benchmark_job(args)
    device = resolve_device(args.device)
    samples = alternating({"cli": cli_path, "api": api_path}, job, 1 + args.repeats, device)
    timings = {name: harness.timing(runs, warmup=1) for name, runs in samples.items()}
    medians = {name: timing["median_s"] for name, timing in timings.items()}
    ratio = harness.ratios(medians, "cli")["api_over_cli"]
    report = {
        "benchmark": "Python API vs CLI: the demo defense end to end (load, defend, save)",
        "config": vars(args),
        "results": timings,
        "api_over_cli": ratio,
        "api_within_5_percent": ratio <= BOUND,
    }
    harness.write_result(report, args.out, device, echo=True)


if __name__ == "__main__":
    harness.run(main)
