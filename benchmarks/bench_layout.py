"""CPU evidence for the engine's evaluation defaults: channels_last and small batches.

Times the demo model's eval-mode forward per image at several batch sizes, NCHW against
channels_last, and its training step (forward + backward, batch 32) in both layouts; medians of
``--repeats`` passes over ``--images`` random images (1,024), JSON with the device, versions, date
and command:

    python benchmarks/bench_layout.py --out benchmarks/results/layout_demo_cpu.json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rnp_fast import harness

BATCHES = (32, 64, 128, 256, 512)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
TRAIN_BATCH = 32
TRAIN_REPEATS = 5  # per --repeats: one step is short, so it gets more samples


def eval_ms_per_image(model: torch.nn.Module, images: torch.Tensor, layout, repeats: int) -> dict[int, float]:
    """Milliseconds per image of an eval-mode pass over ``images``, per batch size."""
    model.eval()
    per_batch = {}
    with torch.no_grad():
        for size in BATCHES:
            batches = [x.contiguous(memory_format=layout) for x in images.split(size)]
            seconds = harness.median_seconds(lambda xs=batches: [model(x) for x in xs], repeats)
            per_batch[size] = 1e3 * seconds / len(images)
    return per_batch


def train_step_ms(model: torch.nn.Module, images: torch.Tensor, layout, repeats: int) -> float:
    model.train()
    x = images[:TRAIN_BATCH].contiguous(memory_format=layout)
    labels = torch.randint(0, 10, (len(x),))
    return 1e3 * harness.median_seconds(lambda: F.cross_entropy(model(x), labels).backward(), repeats * TRAIN_REPEATS)


def main() -> None:
    parser = harness.parser(__doc__, repeats=3)
    parser.add_argument("--images", type=harness.positive, default=1024, help="random images per pass")
    args = parser.parse_args()
    _, run = harness.demo_run(device="cpu")
    images = torch.randn(args.images, *run.source.image_shape)
    result = {"benchmark": "CPU layout and evaluation batch (demo model)"}
    for name, layout in LAYOUTS.items():
        model = run.new_model().to(memory_format=layout)  # speed does not depend on the weights
        result[f"eval_ms_per_image_{name}"] = eval_ms_per_image(model, images, layout, args.repeats)
        result[f"train_step_ms_{name}"] = train_step_ms(model, images, layout, args.repeats)
    harness.write_result(result, args.out, run.device, echo=True)


if __name__ == "__main__":
    harness.run(main)
