"""Pruning-sweep benchmark: batched (all candidates per pass) against sequential and reference mode.

Workloads:
- demo: the bundled digits model, its full test sets (599 clean + the poisoned non-target ones);
- cifar: ResNet-18 (random weights: speed does not depend on them) on CIFAR-shaped synthetic data,
  9,000 clean + 9,000 poisoned images, as in the reference's CIFAR-10 protocol.
Masks come from ``--mask-file`` (e.g. a run's mask_values.txt, or the reference's published one for
the cifar workload) or are seeded random values; the thresholds are the default 0, 0.05, ..., 0.9.

Every provider scores the same steps on the same device; each is run once untimed (warm-up, and
compilation where there is any), then ``--repeats`` times; medians and ratios go to JSON with the
device, versions, date and command:

    python benchmarks/bench_sweep.py --workload demo --device cpu --mask-file RUN/mask_values.txt \\
        --batch-size 64 --channels-last --out benchmarks/results/sweep_demo_cpu.json
    python benchmarks/bench_sweep.py --workload cifar --device cuda --amp bf16 --channels-last \\
        --out benchmarks/results/sweep_cifar_h100.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rnp_fast.attacks import build_trigger
from rnp_fast.bench import provenance, save_result
from rnp_fast.checkpoint import load_model_weights
from rnp_fast.demo import DEMO_MODEL, demo_checkpoint
from rnp_fast.device import resolve_device
from rnp_fast.evaluate import build_test_sets
from rnp_fast.loaders.sources import ImageSet, load_source
from rnp_fast.models import build_model
from rnp_fast.prune import Channel, rank_channels, threshold_schedule
from rnp_fast.pruning_eval import SweepOptions, score_steps
from rnp_fast.report import read_mask_file


def workload(name: str, device: torch.device):
    if name == "demo":
        source = load_source("digits")
        model = load_model_weights(build_model("resnet18", 10, DEMO_MODEL.width), demo_checkpoint(), "resnet18")
        test = source.test
    else:
        from rnp_fast.loaders.synthetic import synthetic_cifar10_source

        source = synthetic_cifar10_source(train_images=1)
        torch.manual_seed(0)
        model = build_model("resnet18", 10)
        labels = torch.arange(10_000) % 10  # exactly 9,000 non-target images for target 0
        test = ImageSet(source.test.images, labels)
    trigger = build_trigger("badnets", image_size=32, channels=3)
    data = build_test_sets(test, trigger, "all2one", 0, 10, source.mean, source.std, device)
    return model.to(device).eval(), data


def random_masks(model: torch.nn.Module, seed: int = 0) -> list[Channel]:
    generator = torch.Generator().manual_seed(seed)
    channels = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            values = torch.rand(module.num_features, generator=generator).tolist()
            channels += [Channel(name, index, value) for index, value in enumerate(values)]
    return channels


def timed(function, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    warmup = once()
    return warmup, [once() for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=("demo", "cifar"), default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--mask-file", help="mask_values.txt to rank (default: seeded random masks)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--amp", choices=("bf16", "off"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--providers", default="batched,sequential,reference")
    parser.add_argument("--out", help="save the result as JSON here")
    args = parser.parse_args()

    device = resolve_device(args.device)
    model, data = workload(args.workload, device)
    channels = read_mask_file(args.mask_file) if args.mask_file else random_masks(model)
    steps = threshold_schedule(rank_channels(channels), 0.90, 0.05)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    options = {
        "batched": SweepOptions(
            sweep_mode="batched", batch_size=args.batch_size, amp=amp, channels_last=args.channels_last
        ),
        "sequential": SweepOptions(
            sweep_mode="sequential", batch_size=args.batch_size, amp=amp, channels_last=args.channels_last
        ),
        "reference": SweepOptions(mode="reference", batch_size=512),  # the reference's own way
    }
    results, metrics = {}, {}
    for provider in args.providers.split(","):
        print(f"{provider} ...", file=sys.stderr)

        def run(p=provider):
            metrics[p] = score_steps(model, steps, data, options[p])

        warmup, runs = timed(run, args.repeats, device)
        results[provider] = {"warmup_s": warmup, "runs_s": runs, "median_s": statistics.median(runs)}
    medians = {p: r["median_s"] for p, r in results.items()}
    report = {
        "benchmark": "pruning sweep",
        "workload": args.workload,
        **provenance(device),
        "masks": args.mask_file or "seeded random values (seed 0)",
        "steps": len(steps),
        "distinct_prune_sets": len({s.count for s in steps}),
        "images": {"clean": len(data.clean.labels), "poisoned": len(data.poisoned.labels)},
        "results": results,
        "ratios": {
            f"{other}_over_batched": medians[other] / medians["batched"]
            for other in medians
            if other != "batched" and "batched" in medians
        },
        "batched_equals_sequential": metrics.get("batched") == metrics.get("sequential")
        if {"batched", "sequential"} <= metrics.keys()
        else None,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        save_result(report, args.out)


if __name__ == "__main__":
    main()
