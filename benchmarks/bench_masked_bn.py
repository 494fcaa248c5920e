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

``--micro`` (the default on CUDA) times the operator alone against PyTorch eager (the reference)
and torch.compile'd PyTorch, forward and forward + backward, at the input shape of every masked
BatchNorm of the same model (CIFAR ResNet-18 at batch 128: (64, 32, 32), (128, 16, 16), (256, 8,
8), (512, 4, 4)), in bf16 and fp32: the recover setting, i.e. training mode (batch statistics,
running statistics updated), fp32 parameters and statistics, gradients for x and the mask only.
GB/s counts the activations' minimal DRAM traffic, the same for every provider: the forward reads
x and writes y (2 tensors), forward + backward also reads dy and x and writes dx (5 in all).

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
from rnp_fast.engine import (
    AMP_DTYPES,
    EngineSettings,
    configure_backends,
    raise_recompile_limit,
    use_persistent_cache,
)
from rnp_fast.errors import UserError
from rnp_fast.kernels import auto_table, masked_batch_norm_reference, triton_available
from rnp_fast.learning import build_stage, recover_recipe
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d, masked_batchnorm_layers
from rnp_fast.models import ARCHITECTURES, build_model
from rnp_fast.provenance import provenance

KERNELS = {"torch": "torch", "fused": "triton"}  # the table's name -> choose_bn_kernels' kernel
PROVIDERS = ("eager", "compiled", "fused")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TENSORS_MOVED = {"fwd": 2, "fwd+bwd": 5}  # activation-sized reads + writes (see above)
MOMENTUM, EPS = 0.1, 1e-5


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
# The operator alone: micro-benchmark
# ----------------------------------------------------------------------------------------------


def bn_shapes(args, device: torch.device) -> list[tuple[int, ...]]:
    """The input shape of every masked BatchNorm of the model at each --batch, each shape once."""
    model = build_model(args.arch, args.num_classes, args.width, MaskedBatchNorm2d).to(device).eval()
    shapes: list[tuple[int, ...]] = []
    hooks = [
        layer.register_forward_pre_hook(lambda _, inputs: shapes.append(tuple(inputs[0].shape)))
        for _, layer in masked_batchnorm_layers(model)
    ]
    with torch.no_grad():
        for batch in args.batch:
            model(torch.zeros(batch, 3, args.image_size, args.image_size, device=device))
    for hook in hooks:
        hook.remove()
    return list(dict.fromkeys(shapes))


def make_inputs(shape, dtype: torch.dtype, channels_last: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """x and dy in ``dtype``; fp32 gamma and beta (frozen), mask in [0, 1] and running statistics."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    c, vec = shape[1], {"generator": g, "device": device}
    return {
        "x": x.requires_grad_(True),
        "weight": torch.randn(c, **vec),
        "bias": torch.randn(c, **vec),
        "mask": torch.rand(c, **vec).requires_grad_(True),
        "running_mean": torch.zeros(c, device=device),
        "running_var": torch.ones(c, device=device),
        "dy": torch.randn_like(x).detach(),
    }


@functools.cache
def provider_fn(provider: str):
    """The masked BatchNorm of ``provider`` (one compiled reference per process: each shape compiles once)."""
    if provider == "eager":
        return masked_batch_norm_reference
    if provider == "compiled":
        raise_recompile_limit()  # a static-shape version per shape, dtype and pass
        return torch.compile(masked_batch_norm_reference, fullgraph=True, dynamic=False)
    from rnp_fast.kernels.ops import masked_batch_norm

    return masked_batch_norm


def pass_fn(provider: str, pass_: str, inputs: dict[str, torch.Tensor]):
    """The timed work: the forward, or the forward and the gradients of x and the mask."""
    fn = provider_fn(provider)
    names = ("x", "weight", "bias", "mask", "running_mean", "running_var")

    def forward():
        return fn(*(inputs[name] for name in names), True, MOMENTUM, EPS)

    if pass_ == "fwd":
        return forward
    return lambda: torch.autograd.grad(forward(), (inputs["x"], inputs["mask"]), inputs["dy"])


def micro_benchmark(args, device: torch.device) -> list[dict]:
    """Per BatchNorm shape, dtype and pass: a row per provider, then the ratios to eager."""
    rows = []
    for shape, dtype, pass_ in itertools.product(bn_shapes(args, device), args.dtypes, args.passes):
        inputs = make_inputs(shape, DTYPES[dtype], args.channels_last, device)
        case = {"shape": list(shape), "dtype": dtype, "pass": pass_}
        medians = {}
        for provider in args.providers:
            row = micro_case(args, device, inputs, pass_, provider)
            rows.append({**case, **row})
            medians[provider] = row["median_ms"]
            print(f"{'x'.join(map(str, shape))} {dtype} {pass_:7s} {provider:8s} {row['median_ms']:.4f} ms")
        rows.append({**case, **harness.ratios(medians, "eager")})
    return rows


def micro_case(args, device: torch.device, inputs: dict[str, torch.Tensor], pass_: str, provider: str) -> dict:
    timing = harness.measure(pass_fn(provider, pass_, inputs), args.repeats, device, args.warmup)
    moved = TENSORS_MOVED[pass_] * inputs["x"].numel() * inputs["x"].element_size()
    gbps = moved / timing["median_s"] / 1e9
    return {"provider": provider, **timing, "median_ms": timing["median_s"] * 1e3, "gb_per_s": gbps}


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
    p.add_argument("--micro", action=argparse.BooleanOptionalAction, help="the operator alone (default: on CUDA)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    return p.parse_args(argv)


def settle(args: argparse.Namespace) -> torch.device:
    """The device, with the device-dependent defaults filled in and what cannot run refused."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.amp = args.amp or (["bf16"] if cuda else ["off"])  # the engine's defaults
    args.channels_last = cuda if args.channels_last is None else args.channels_last
    args.micro = cuda if args.micro is None else args.micro
    if not (args.micro or args.write_auto_table):
        raise UserError("nothing to measure: pass --write-auto-table or --micro")
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
    if args.micro:
        result["micro"] = micro_benchmark(args, device)
    if args.write_auto_table:
        result["recover_steps"] = write_auto_table(args, device)
    harness.write_result(result, args.out, device)


if __name__ == "__main__":
    harness.run(main)
