"""The fused masked-BatchNorm operator timed where it matters: in the whole recover step, and alone.

``--write-auto-table`` decides where ``--bn-kernel auto`` takes the operator. Per case (--arch at
--width, every --batch of --image-size images, every --amp) it builds the masked model as the
recover stage does and times the recover step: forward + alpha * CE, backward, the SGD step and
the mask clamp, with every masked BatchNorm in PyTorch (``choose_bn_kernels`` "torch") and with the
fused operator ("triton"), under the same engine settings (--compile, --cuda-graphs,
--channels-last). An isolated BatchNorm timing does not decide: Inductor fuses PyTorch's BatchNorm
with its neighbours, the operator is opaque to it, so only the whole step tells which is faster.
The two steps are timed in turn, round after round, so drifting clocks or temperature hit both
alike; medians after --warmup rounds (compilation, capture, cuDNN autotuning) go to the table
(``kernels/auto_table.json``, or --table) with their winner, the device, versions and date.

The operator alone (against PyTorch eager and compiled, forward and forward + backward) is a
micro-benchmark: `make bench-micro` (benchmarks/micro/test_micro_masked_bn.py).

On the CPU the operator is its PyTorch implementation: the code path is the same (the tests run
it), the numbers mean nothing, so a CPU run never writes the package's table. Examples:

    python benchmarks/bench_masked_bn.py --write-auto-table --out benchmarks/results/masked_bn_<device>.json
    python benchmarks/bench_masked_bn.py --device cpu --write-auto-table --table /tmp/table.json \\
        --width 0.125 --batch 8 --image-size 8 --repeats 2 --warmup 1
"""

from __future__ import annotations

import argparse
import functools
import itertools
from pathlib import Path

import torch

from rnp_fast import harness
from rnp_fast.config import RNPConfig
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.engine import AMP_DTYPES, EngineSettings, configure_backends, use_persistent_cache
from rnp_fast.errors import UserError
from rnp_fast.kernels import auto_table, triton_available
from rnp_fast.learning import build_stage, recover_recipe
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d
from rnp_fast.models import ARCHITECTURES, build_model
from rnp_fast.provenance import provenance

KERNELS = {"torch": "torch", "fused": "triton"}  # the table's name -> choose_bn_kernels' kernel


# ----------------------------------------------------------------------------------------------
# The recover step, with and without the fused operator: the auto table
# ----------------------------------------------------------------------------------------------


def recover_step(args, device: torch.device, engine: EngineSettings, images: torch.Tensor):
    """(masked model, its recover step) as `rnp_fast.recover.recover` sets them up, from seed 0
    weights (the same for both kernels; their values do not change the step's work)."""
    torch.manual_seed(0)
    unlearned = build_model(args.arch, args.num_classes, args.width).to(device)
    masked = build_model(args.arch, args.num_classes, args.width, MaskedBatchNorm2d).to(device)
    stage = build_stage(recover_recipe(RNPConfig()), masked, engine, len(images), images, weights=unlearned)
    return masked, stage.step


def measure_case(args, device: torch.device, batch: int, amp: str) -> tuple[dict, dict]:
    """One case of the table, and both kernels' timings: their recover steps on one random batch, in turn."""
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, 3, args.image_size, args.image_size)
    images = torch.randn(shape, generator=generator, device=device)
    labels = torch.randint(0, args.num_classes, (batch,), generator=generator, device=device)
    settings = {"compile": args.compile, "cuda_graphs": args.cuda_graphs, "channels_last": args.channels_last}
    steps, model = {}, None
    for name, kernel in KERNELS.items():
        engine = EngineSettings(amp=AMP_DTYPES[amp], bn_kernel=kernel, **settings)
        model, steps[name] = recover_step(args, device, engine, images)
    timings = time_in_turn(steps, images, labels, device, args.repeats, args.warmup)
    medians = {name: timing["median_s"] * 1e3 for name, timing in timings.items()}
    key = auto_table.case_key(describe_device(device), model, shape, AMP_DTYPES[amp])
    case = {"key": key, "arch": args.arch, "width": args.width, "shape": list(shape), "amp": amp, **settings}
    case.update({f"{name}_ms": ms for name, ms in medians.items()})
    case.update({f"{name}_warmup_s": timing["warmup_s"] for name, timing in timings.items()})
    return {**case, **harness.ratios(medians, "torch"), "repeats": args.repeats, "warmup": args.warmup}, timings


def time_in_turn(steps: dict, images, labels, device: torch.device, repeats: int, warmup: int) -> dict:
    """Each step once per round, ``warmup`` rounds then ``repeats`` timed ones (see `harness.timing`)."""
    samples = {name: [] for name in steps}
    for _ in range(warmup + repeats):
        for name, step in steps.items():
            samples[name].append(harness.seconds(functools.partial(step, images, labels), device))
    return {name: harness.timing(seconds, warmup) for name, seconds in samples.items()}


def write_auto_table(args, device: torch.device) -> list[dict]:
    """Measure every case, write the table (merged with the cases already in it), return the runs."""
    cases, runs = [], []
    for batch, amp in itertools.product(args.batch, args.amp):
        case, timings = measure_case(args, device, batch, amp)
        cases.append(case)
        runs.append({**case, "timings": timings})
        print(f"{case['key']}: torch {case['torch_ms']:.3f} ms, fused {case['fused_ms']:.3f} ms")
    path = auto_table.write_table(cases, provenance(device), args.table)
    print(f"wrote {path}")
    return runs


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.parser(__doc__, device="cuda", repeats=50)
    p.add_argument("--warmup", type=harness.positive, default=3, help="untimed rounds first (compilation)")
    p.add_argument("--arch", default="resnet18", choices=list(ARCHITECTURES))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of the model")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=harness.positive, nargs="+", default=[128], help="batch sizes (images)")
    p.add_argument("--image-size", type=harness.positive, default=32, help="image height = width (pixels)")
    p.add_argument("--amp", nargs="+", choices=["bf16", "off"], help="recover step precision (default: the device's)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="default: on on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the recover steps")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the recover steps as CUDA graphs")
    p.add_argument("--write-auto-table", action="store_true", help="time the recover steps, write the table")
    p.add_argument("--table", type=Path, default=auto_table.TABLE, help="the table to write (default: %(default)s)")
    return p.parse_args(argv)


def settle(args: argparse.Namespace) -> torch.device:
    """The device, with the device-dependent defaults filled in and what cannot run refused."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.amp = args.amp or (["bf16"] if cuda else ["off"])  # the engine's defaults
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    if not args.write_auto_table:
        raise UserError("nothing to measure: pass --write-auto-table (the operator alone: make bench-micro)")
    if args.cuda_graphs and not cuda:
        raise UserError("--cuda-graphs needs a CUDA device")
    if cuda and not triton_available():
        raise UserError("the fused operator needs Triton on CUDA: pip install 'rnp-fast[triton]'")
    if args.write_auto_table and not cuda and args.table.resolve() == auto_table.TABLE.resolve():
        raise UserError(
            "CPU timings of the operator's PyTorch implementation do not belong in the package's table: "
            "pass --table PATH"
        )
    if not args.width > 0:
        raise UserError(f"--width must be > 0, got {args.width}")
    if args.write_auto_table:
        auto_table.vet_table_path(args.table)  # before any work: never over a file rnp-fast did not make
    return device


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = settle(args)
    configure_backends(EngineSettings(), device)  # cuDNN autotuning on CUDA, as every run has it
    if args.compile:
        use_persistent_cache()
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    result["recover_steps"] = write_auto_table(args, device)
    harness.write_result(result, args.out, device)


if __name__ == "__main__":
    harness.run(main)
