"""CPU evidence for the engine's evaluation defaults: channels_last and small batches.

Times the demo model's eval-mode forward per image at several batch sizes, NCHW against
channels_last, and its training step (forward + backward, batch 32) in both layouts; medians of
``--repeats`` passes over 1,024 random images, JSON with the device, versions, date and command:

    python benchmarks/bench_layout.py --out benchmarks/results/layout_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from rnp_fast.bench import provenance, save_result
from rnp_fast.demo import DEMO_MODEL
from rnp_fast.models import build_model

BATCHES = (32, 64, 128, 256, 512)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="save the result as JSON here")
    args = parser.parse_args()
    images = torch.randn(1024, 3, 32, 32)
    labels = torch.randint(0, 10, (32,))
    result = {"benchmark": "CPU layout and evaluation batch (demo model)", **provenance(torch.device("cpu"))}
    for name, layout in LAYOUTS.items():
        model = build_model(DEMO_MODEL.arch, 10, DEMO_MODEL.width).to(memory_format=layout)
        batches = {b: [x.contiguous(memory_format=layout) for x in images.split(b)] for b in BATCHES}
        with torch.no_grad():
            model.eval()
            result[f"eval_ms_per_image_{name}"] = {
                b: 1e3 * median_seconds(lambda xs=xs, model=model: [model(x) for x in xs], args.repeats) / len(images)
                for b, xs in batches.items()
            }
        model.train()
        x = images[:32].contiguous(memory_format=layout)
        result[f"train_step_ms_{name}"] = 1e3 * median_seconds(
            lambda x=x, model=model: F.cross_entropy(model(x), labels).backward(), args.repeats * 5
        )
    print(json.dumps(result, indent=2))
    if args.out:
        save_result(result, args.out)


if __name__ == "__main__":
    main()
