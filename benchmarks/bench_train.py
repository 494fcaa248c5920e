"""Backdoor-training throughput: the fast engine against eager fp32 doing the same work.

Both providers train the same model on the same device-resident, BadNets-poisoned, augmented data
(CIFAR-shaped synthetic images by default: speed does not depend on pixels) for the same epochs;
"fast" uses the device's fast engine settings for a process that repeats its steps (CUDA:
torch.compile, bf16 autocast, channels_last, fused SGD), "eager" plain fp32. The first epoch is
reported apart (compilation), the others give the median images per second, data and trigger
work included.

    python benchmarks/bench_train.py --device cuda --out benchmarks/results/train_h100.json
    python benchmarks/bench_train.py --device cpu --width 0.125 --images 2000 --epochs 3   # smoke run
"""

from __future__ import annotations

import statistics
import sys

import torch

from rnp_fast import harness
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, TrainConfig
from rnp_fast.engine import EAGER, EngineSettings
from rnp_fast.loaders.synthetic_cifar10 import synthetic_cifar10_source
from rnp_fast.resolved import ResolvedRun, resolve_run
from rnp_fast.train import fit, poisoning_plan


def training_run(args) -> ResolvedRun:
    """ResNet-18 on ``--images`` synthetic CIFAR images, BadNets all2one at 10 % (the defaults)."""
    source = synthetic_cifar10_source(train_images=args.images, test_images=1)
    data = DataConfig(dataset=source.name, batch_size=args.batch_size, augment=True, shuffle=True, seed=0)
    model = ModelConfig("resnet18", args.width)
    return resolve_run(model, data, AttackConfig(), EngineConfig(device=args.device), reuse=True, source=source)


def epoch_seconds(run: ResolvedRun, engine: EngineSettings, epochs: int) -> list[float]:
    """Seconds of every training epoch (each ends in a host sync: its loss and accuracy are read)."""
    data = run.data
    poison = poisoning_plan(run, run.attack)
    loader = run.loader(run.source.train, data.shuffle, data.augment, data.seed, poison=poison)
    torch.manual_seed(0)
    model = run.new_model()
    times: list[float] = []
    fit(model, loader, TrainConfig(epochs=epochs, lr=0.1), lambda stats: times.append(stats.seconds), engine)
    return times


def throughput(times: list[float], images: int) -> dict:
    warm = times[1:] or times  # the first epoch compiles; with one epoch there is nothing else
    return {
        "first_epoch_s": times[0],
        "epoch_s": times,
        "median_epoch_s": statistics.median(warm),
        "images_per_second": images / statistics.median(warm),
    }


def main() -> None:
    parser = harness.parser(__doc__, device="auto")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=harness.positive, default=50_000)
    parser.add_argument("--epochs", type=harness.positive, default=5)
    parser.add_argument("--batch-size", type=harness.positive, default=512)
    args = parser.parse_args()
    run = training_run(args)
    results = {}
    for provider, engine in (("eager", EAGER), ("fast", run.engine)):
        print(f"{provider} ...", file=sys.stderr)
        results[provider] = throughput(epoch_seconds(run, engine, args.epochs), args.images)
    report = {
        "benchmark": "train-backdoor throughput (BadNets, augmentation and trigger on the device)",
        "config": vars(args),
        "engine": run.engine.describe(),
        "results": results,
        "fast_over_eager": results["fast"]["images_per_second"] / results["eager"]["images_per_second"],
    }
    harness.write_result(report, args.out, run.device, echo=True)


if __name__ == "__main__":
    harness.run(main)
