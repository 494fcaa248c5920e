"""The demo defense phase by phase: each phase timed on its own, the fast way against the reference's.

Built from the same pieces `rnp-fast defend` runs (the resolved run, the RNP stages, the scoring),
on the demo model and data, with the fast engine's settings for the device (``--device``):

- an unlearning epoch: the device-resident loader and engine vs the reference mode's DataLoader;
- a recovering epoch: masked BatchNorm in PyTorch vs the fused Triton kernel (CUDA only);
- one per-epoch evaluation of both test sets: device-resident vs the reference's DataLoader;
- scoring the 19 default thresholds: batched vs sequential vs reference mode.

Epochs come from the stages' own per-epoch timings (the first epoch, which compiles or captures
the step, is the warm-up); evaluation and scoring are timed calls after one warm-up call. Medians
and ratios go to JSON with the device, versions, date and command:

    python benchmarks/bench_phases.py --device cuda --out benchmarks/results/phases_<device>.json
"""

from __future__ import annotations

import sys
from dataclasses import replace

from bench_scoring import PROVIDERS, random_masks, scorer, threshold_steps

from rnp_fast import harness
from rnp_fast.data import defense_data
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d
from rnp_fast.recover import recover
from rnp_fast.unlearn import unlearn

WARMUP_EPOCHS = 1


class Demo:
    """What every phase works on: the demo's backdoored model, its defense images and its run."""

    def __init__(self, device: str):
        self.device = device  # as asked (auto, cpu, cuda): every variant resolves it the same way
        job, self.run = harness.demo_run(device=device)
        self.model = self.run.load_model(job.model_path)
        self.images = defense_data(self.run.source, job.data).train

    def variant(self, **engine):
        """The demo's job and run with these EngineConfig fields."""
        return harness.demo_run(device=self.device, **engine)


def unlearn_epochs(demo: Demo, repeats: int) -> dict:
    """Per mode: the unlearning stage run for the warm-up and ``repeats`` epochs (no early stop)."""
    timings = {}
    for mode in ("fast", "reference"):
        job, run = demo.variant(mode=mode)
        rnp = replace(job.rnp, unlearning_epochs=WARMUP_EPOCHS + repeats - 1, early_stop=False)
        result = unlearn(demo.model, run.defense_loader(demo.images), rnp, engine=run.engine)
        timings[mode] = epoch_timing([stats.seconds for stats in result.history])
    return timings


def recover_epochs(demo: Demo, repeats: int) -> dict:
    """Per BatchNorm kernel: the recovering stage (masks on the backdoored weights), as many epochs."""
    timings = {}
    for kernel in ("torch", "triton") if demo.run.device.type == "cuda" else ("torch",):
        job, run = demo.variant(bn_kernel=kernel)
        rnp = replace(job.rnp, recovering_epochs=WARMUP_EPOCHS + repeats)
        masked = run.new_model(MaskedBatchNorm2d)
        result = recover(masked, demo.model, run.defense_loader(demo.images), rnp, engine=run.engine)
        timings[kernel] = epoch_timing([stats.seconds for stats in result.history])
    return timings


def epoch_timing(seconds: list[float]) -> dict:
    # A diverged unlearning epoch ends the stage early: time what ran, the warm-up apart if more did.
    return harness.timing(seconds, WARMUP_EPOCHS if len(seconds) > WARMUP_EPOCHS else 0)


def evaluations(demo: Demo, repeats: int) -> dict:
    """Per mode: one evaluation of both test sets (what --eval-every costs per epoch)."""
    timings = {}
    for mode in ("fast", "reference"):
        evaluator = demo.variant(mode=mode)[1].evaluator()
        timings[mode] = harness.measure(lambda e=evaluator: e(demo.model), repeats, demo.run.device)
    return timings


def scorings(demo: Demo, repeats: int) -> dict:
    """Per provider: every threshold of the default schedule scored, on seeded random masks."""
    steps = threshold_steps(random_masks(demo.model))
    score = {p: scorer(demo.model, steps, demo.run, p) for p in PROVIDERS}
    return {p: harness.measure(score[p], repeats, demo.run.device) for p in PROVIDERS}


# phase: (its timings by variant, the variant the ratios are over)
PHASES = {
    "unlearn": (unlearn_epochs, "fast"),
    "recover": (recover_epochs, "torch"),
    "evaluation": (evaluations, "fast"),
    "scoring": (scorings, "batched"),
}


def main() -> None:
    parser = harness.parser(__doc__, device="auto", repeats=3)
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma separated, of: {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = [p for p in args.phases.split(",") if p]
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases takes {', '.join(PHASES)}; got {args.phases!r}")
    demo = Demo(args.device)
    timed = {}
    for phase in phases:
        print(f"{phase} ...", file=sys.stderr)
        timed[phase] = PHASES[phase][0](demo, args.repeats)
    medians = {phase: {name: t["median_s"] for name, t in timings.items()} for phase, timings in timed.items()}
    result = {
        "benchmark": "demo defense phases",
        "workload": "demo",
        "repeats": args.repeats,
        "phases": timed,
        "ratios": {phase: harness.ratios(medians[phase], PHASES[phase][1]) for phase in timed},
    }
    harness.write_result(result, args.out, demo.run.device, echo=True)


if __name__ == "__main__":
    harness.run(main)
