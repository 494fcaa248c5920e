"""Backdoor-training throughput: the fast engine against eager fp32 doing the same work.

Both providers train the same model on the same device-resident, BadNets-poisoned, augmented data
(CIFAR-shaped synthetic images by default: speed does not depend on pixels) for the same epochs;
"fast" uses the device's fast engine settings (CUDA: torch.compile, bf16 autocast, channels_last,
fused SGD), "eager" plain fp32. The first epoch is reported apart (compilation), the others give
the median images per second, data and trigger work included.

    python benchmarks/bench_train.py --device cuda --out benchmarks/results/train_h100.json
    python benchmarks/bench_train.py --device cpu --width 0.125 --images 2000 --epochs 3   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rnp_fast.attacks import build_trigger
from rnp_fast.attacks.base import training_plan
from rnp_fast.bench import provenance, save_result
from rnp_fast.config import EngineConfig
from rnp_fast.device import resolve_device
from rnp_fast.engine import EAGER, resolve_engine
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.loaders.synthetic import synthetic_cifar10_source
from rnp_fast.models import build_model
from rnp_fast.train import TrainConfig, fit


def epoch_seconds(provider: str, args, device: torch.device) -> list[float]:
    source = synthetic_cifar10_source(train_images=args.images, test_images=1)
    trigger = build_trigger("badnets", image_size=32, channels=3)
    plan = training_plan(trigger, source.train.labels, 0.1, "all2one", 0, 10, 0)
    loader = DeviceLoader(
        ImageSet(source.train.images, source.train.labels),
        source.mean,
        source.std,
        args.batch_size,
        device,
        shuffle=True,
        augment=True,
        seed=0,
        poison=plan,
    )
    torch.manual_seed(0)
    model = build_model("resnet18", 10, args.width).to(device)
    engine = resolve_engine(EngineConfig(device=device.type), device) if provider == "fast" else EAGER
    times: list[float] = []
    last = [time.perf_counter()]

    def on_epoch(stats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    fit(model, loader, TrainConfig(epochs=args.epochs, lr=0.1), on_epoch, engine)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", help="save the result as JSON here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    results = {}
    for provider in ("eager", "fast"):
        print(f"{provider} ...", file=sys.stderr)
        times = epoch_seconds(provider, args, device)
        warm = times[1:] or times
        results[provider] = {
            "first_epoch_s": times[0],
            "epoch_s": times,
            "median_epoch_s": statistics.median(warm),
            "images_per_second": args.images / statistics.median(warm),
        }
    report = {
        "benchmark": "train-backdoor throughput (BadNets, augmentation and trigger on the device)",
        **provenance(device),
        "config": vars(args),
        "results": results,
        "fast_over_eager": results["fast"]["images_per_second"] / results["eager"]["images_per_second"],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        save_result(report, args.out)


if __name__ == "__main__":
    main()
