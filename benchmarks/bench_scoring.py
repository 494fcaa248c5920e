"""Scoring benchmark: every pruning candidate scored batched (all per pass), sequentially, and as the reference does.

Workloads:
- demo: the bundled digits model, its full test sets (599 clean + the poisoned non-target ones);
- cifar: ResNet-18 (random weights: speed does not depend on them) on CIFAR-shaped synthetic data,
  9,000 clean + 9,000 poisoned images, as in the reference's CIFAR-10 protocol.
Masks come from ``--mask-file`` (e.g. a run's mask_values.txt, or the reference's published one for
the cifar workload) or are seeded random values; the thresholds are the default 0, 0.05, ..., 0.9.

Every provider scores the same steps on the same device; each is run once untimed (warm-up, and
compilation where there is any), then ``--repeats`` times; medians and ratios go to JSON with the
device, versions, date and command:

    python benchmarks/bench_scoring.py --workload demo --device cpu --mask-file RUN/mask_values.txt \\
        --batch-size 64 --channels-last --out benchmarks/results/scoring_demo_cpu.json
    python benchmarks/bench_scoring.py --workload cifar --device cuda --amp bf16 --channels-last \\
        --out benchmarks/results/scoring_cifar_h100.json
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
from torch import nn

from rnp_fast import harness
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig
from rnp_fast.errors import UserError
from rnp_fast.evaluation.scoring import ScoringOptions, score_steps
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.loaders.synthetic_cifar10 import synthetic_cifar10_source
from rnp_fast.prune import Channel, PruneStep, rank_channels, threshold_schedule
from rnp_fast.report import read_mask_file
from rnp_fast.resolved import ResolvedRun, resolve_run

PROVIDERS = ("batched", "sequential", "reference")
REFERENCE_BATCH = 512  # the reference's evaluation batch


def workload(name: str, **engine) -> tuple[ResolvedRun, nn.Module]:
    """The run (device, test sets, engine: ``engine`` are EngineConfig fields) and the model whose
    pruning candidates are scored, in eval mode."""
    if name == "demo":
        job, run = harness.demo_run(**engine)
        return run, run.load_model(job.model_path).eval()
    source = synthetic_cifar10_source(train_images=1)
    labels = torch.arange(len(source.test)) % 10  # exactly 9,000 non-target images for target 0
    source = replace(source, test=ImageSet(source.test.images, labels))
    sections = ModelConfig("resnet18"), DataConfig(dataset=source.name), AttackConfig(), EngineConfig(**engine)
    run = resolve_run(*sections, reuse=True, source=source)
    torch.manual_seed(0)
    return run, run.new_model().eval()


def random_masks(model: nn.Module, seed: int = 0) -> list[Channel]:
    """A seeded random mask value for every BatchNorm channel (what a defense would have learned)."""
    generator = torch.Generator().manual_seed(seed)
    channels = []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            values = torch.rand(module.num_features, generator=generator).tolist()
            channels += [Channel(name, index, value) for index, value in enumerate(values)]
    return channels


def threshold_steps(channels: list[Channel]) -> list[PruneStep]:
    """The default schedule (the RNP section's defaults): thresholds 0, 0.05, ..., 0.9."""
    rnp = RNPConfig()
    return threshold_schedule(rank_channels(channels), rnp.pruning_max, rnp.pruning_step)


def scorer(model: nn.Module, steps: list[PruneStep], run: ResolvedRun, provider: str, batch_size: int | None = None):
    """A call that scores every step on the run's test sets as ``provider`` does: the run's engine
    settings, batched or sequential, at ``batch_size`` images per forward (default: the run's), or
    the reference's own way (eager fp32 NCHW, one evaluation per threshold)."""
    if provider == "reference":
        options = ScoringOptions(mode="reference", batch_size=REFERENCE_BATCH)
    else:
        options = replace(run.scoring(), scoring=provider, batch_size=batch_size or run.eval_batch)
    return lambda: score_steps(model, steps, run.tests, options)


def time_providers(model, steps: list[PruneStep], run: ResolvedRun, args) -> tuple[dict, dict]:
    """Each provider's timing, and the metrics its last run gave (batched and sequential must agree)."""
    results, metrics = {}, {}
    for provider in args.providers.split(","):
        print(f"{provider} ...", file=sys.stderr)
        score = scorer(model, steps, run, provider, args.batch_size)

        def once(provider=provider, score=score):
            metrics[provider] = score()

        results[provider] = harness.measure(once, args.repeats, run.device)
    return results, metrics


def main() -> None:
    parser = harness.parser(__doc__, device="auto", repeats=3)
    parser.add_argument("--workload", choices=("demo", "cifar"), default="demo")
    parser.add_argument("--mask-file", help="mask_values.txt to rank (default: seeded random masks)")
    parser.add_argument("--batch-size", type=harness.positive, default=512)
    parser.add_argument("--amp", choices=("bf16", "off"), default="off")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args()
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        raise UserError(f"--providers takes {', '.join(PROVIDERS)}; got {', '.join(sorted(unknown))}")
    run, model = workload(args.workload, device=args.device, amp=args.amp, channels_last=args.channels_last)
    steps = threshold_steps(read_mask_file(args.mask_file) if args.mask_file else random_masks(model))
    results, metrics = time_providers(model, steps, run, args)
    report = {
        "benchmark": "scoring the pruning candidates",
        "workload": args.workload,
        "masks": args.mask_file or "seeded random values (seed 0)",
        "steps": len(steps),
        "distinct_prune_sets": len({s.count for s in steps}),
        "images": {"clean": len(run.tests.clean.labels), "poisoned": len(run.tests.poisoned.labels)},
        "results": results,
        "ratios": harness.ratios({p: r["median_s"] for p, r in results.items()}, "batched"),
        "batched_equals_sequential": metrics["batched"] == metrics["sequential"]
        if {"batched", "sequential"} <= metrics.keys()
        else None,
    }
    harness.write_result(report, args.out, run.device, echo=True)


if __name__ == "__main__":
    harness.run(main)
