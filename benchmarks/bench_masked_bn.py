"""Masked BatchNorm benchmarks: eager reference, torch.compile'd reference and the Triton kernel.

Shapes: every BatchNorm of CIFAR ResNet-18, (C, H, W) = (64, 32, 32), (128, 16, 16), (256, 8, 8),
(512, 4, 4), at batch 128 (the RNP batch) and 512. Setting: the recover stage, i.e. training mode
(batch statistics, running statistics updated), bf16 channels_last activations, fp32 parameters
and running statistics (AMP), gradients for x and the mask only (gamma and beta are frozen).
Passes: forward, backward (the forward graph built untimed before each round), both.

GB/s counts the minimal DRAM traffic of the activations, the same for every provider so it
compares like with like: forward reads x and writes y (2 tensors), backward reads dy and x and
writes dx (3), both 5. Per-channel vectors are negligible.

warmup_s is the time of a case's first call. Compilation (Inductor for "compiled", Triton's JIT
for "triton") is cached per shape, so it lands in the first pass measured for each shape.

GPU only. As a pytest-benchmark suite (skipped without CUDA):
    pytest benchmarks/bench_masked_bn.py --benchmark-columns=median,iqr,rounds
Standalone, writing medians and ratios to JSON with the device, versions, date and command:
    python benchmarks/bench_masked_bn.py --out benchmarks/results/masked_bn_h100.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from rnp_fast.bench import provenance
from rnp_fast.kernels.reference import masked_batch_norm_reference

SHAPES = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]  # (C, H, W)
BATCHES = [128, 512]
PASSES = ["fwd", "bwd", "fwd+bwd"]
PROVIDERS = ["eager", "compiled", "triton"]
MOMENTUM, EPS = 0.1, 1e-5
TENSORS_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # activation-sized reads + writes (see above)
WARMUP_CALLS = 3  # the first call compiles (Inductor or Triton); the rest settle caches and clocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")


def make_inputs(batch: int, c: int, h: int, w: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """bf16 channels_last x and dy; fp32 gamma, beta, mask (in [0, 1]) and running statistics."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn((batch, c, h, w), generator=g, device=device, dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last).requires_grad_(True)
    vec = {"generator": g, "device": device}
    return {
        "x": x,
        "weight": torch.randn(c, **vec),
        "bias": torch.randn(c, **vec),
        "mask": torch.rand(c, **vec).requires_grad_(True),
        "running_mean": torch.zeros(c, device=device),
        "running_var": torch.ones(c, device=device),
        "dy": torch.randn_like(x).detach(),
    }


def provider_fn(provider: str) -> Callable[..., torch.Tensor]:
    if provider == "eager":
        return masked_batch_norm_reference
    if provider == "compiled":
        return _compiled_reference()
    if provider == "triton":
        from rnp_fast.kernels.masked_bn import masked_batch_norm  # needs triton; imported on use

        return masked_batch_norm
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


_COMPILED: list[Callable[..., torch.Tensor]] = []


def _compiled_reference() -> Callable[..., torch.Tensor]:
    """One compiled reference per process; static shapes, each shape compiled once."""
    if not _COMPILED:
        # 8 shapes x 2 grad modes exceed Dynamo's default of 8 compiled versions per function
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, 64)
        _COMPILED.append(torch.compile(masked_batch_norm_reference, fullgraph=True, dynamic=False))
    return _COMPILED[0]


def make_step(provider: str, pass_: str, inputs: dict[str, torch.Tensor], relu: bool = False):
    """(setup, run): setup() -> (args, kwargs) is untimed, run(*args) is the timed work."""
    fn = provider_fn(provider)
    tensors = [inputs[k] for k in ("x", "weight", "bias", "mask", "running_mean", "running_var")]
    leaves = [inputs["x"], inputs["mask"]]

    def forward():
        return fn(*tensors, training=True, momentum=MOMENTUM, eps=EPS, relu=relu)

    def backward(y):
        return torch.autograd.grad(y, leaves, inputs["dy"])

    if pass_ == "fwd":
        return (lambda: ((), {})), forward
    if pass_ == "bwd":
        return (lambda: ((forward(),), {})), backward
    if pass_ == "fwd+bwd":
        return (lambda: ((), {})), lambda: backward(forward())
    raise ValueError(f"unknown pass {pass_!r}; expected one of {PASSES}")


def warm_up(setup, run) -> float:
    """Seconds taken by the first call (compilation included); WARMUP_CALLS calls in all, untimed."""
    seconds = []
    for _ in range(WARMUP_CALLS):
        args, kwargs = setup()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(*args, **kwargs)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return seconds[0]


def bytes_moved(pass_: str, inputs: dict[str, torch.Tensor]) -> int:
    x = inputs["x"]
    return TENSORS_MOVED[pass_] * x.numel() * x.element_size()


# ----------------------------------------------------------------------------------------------
# pytest-benchmark suite
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES)
def test_masked_bn(benchmark, batch, shape, pass_, provider):
    if provider == "triton":
        pytest.importorskip("triton")
    inputs = make_inputs(batch, *shape)
    setup, run = make_step(provider, pass_, inputs)
    warmup_s = warm_up(setup, run)

    def synced_setup():
        args = setup()
        torch.cuda.synchronize()  # the forward of a "bwd" round stays out of the timed region
        return args

    def synced_run(*args):
        run(*args)
        torch.cuda.synchronize()

    benchmark.group = f"masked_bn {pass_} N={batch} C,H,W={shape}"
    benchmark.pedantic(synced_run, setup=synced_setup, rounds=50, iterations=1)
    benchmark.extra_info.update({"provider": provider, "pass": pass_, "warmup_s": warmup_s, "dtype": "bfloat16"})
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["gb_per_s"] = bytes_moved(pass_, inputs) / benchmark.stats["median"] / 1e9


# ----------------------------------------------------------------------------------------------
# Standalone: JSON results
# ----------------------------------------------------------------------------------------------


def median_ms(setup, run, reps: int) -> float:
    """Median over reps of CUDA-event time around run() alone."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        args, kwargs = setup()
        start.record()
        run(*args, **kwargs)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(batch: int, shape: tuple[int, int, int], pass_: str, provider: str, reps: int, relu: bool) -> dict:
    inputs = make_inputs(batch, *shape)
    setup, run = make_step(provider, pass_, inputs, relu=relu)
    warmup_s = warm_up(setup, run)
    ms = median_ms(setup, run, reps)
    row = {"batch": batch, "C": shape[0], "H": shape[1], "W": shape[2], "pass": pass_, "provider": provider}
    gbps = bytes_moved(pass_, inputs) / (ms * 1e-3) / 1e9
    return {**row, "median_ms": ms, "gb_per_s": gbps, "warmup_s": warmup_s}


def ratios(results: list[dict]) -> list[dict]:
    """Per (batch, shape, pass): baseline time / Triton time (> 1 means Triton is faster)."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in results:
        by_key.setdefault((r["batch"], r["C"], r["H"], r["W"], r["pass"]), {})[r["provider"]] = r["median_ms"]
    out = []
    for (batch, c, h, w, pass_), ms in by_key.items():
        row = {"batch": batch, "C": c, "H": h, "W": w, "pass": pass_}
        if "triton" in ms:
            row.update({f"{p}_over_triton": ms[p] / ms["triton"] for p in ms if p != "triton"})
        out.append(row)
    return out


def environment() -> dict:
    return provenance(torch.device("cuda"), " ".join([Path(sys.executable).name, *sys.argv]))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: results/masked_bn_<device>.json)")
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES, help="batch sizes")
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--passes", nargs="+", default=PASSES, choices=PASSES)
    p.add_argument("--reps", type=int, default=100, help="timed repetitions per case (median reported)")
    p.add_argument("--relu", action="store_true", help="fuse a ReLU after the BatchNorm")
    p.add_argument(
        "--write-auto-table",
        action="store_true",
        help="also write kernels/auto_table.json: the shapes where Triton beats both baselines (--bn-kernel auto)",
    )
    return p.parse_args(argv)


def auto_table(results: list[dict], env: dict) -> dict:
    """Per BatchNorm shape, the provider with the lowest forward+backward median at the largest batch
    measured; `--bn-kernel auto` uses the kernel only where this says triton."""
    both = [r for r in results if r["pass"] == "both"]
    batch = max(r["batch"] for r in both)
    best: dict[tuple[int, int, int], dict] = {}
    for r in (r for r in both if r["batch"] == batch):
        key = (r["C"], r["H"], r["W"])
        if key not in best or r["median_ms"] < best[key]["median_ms"]:
            best[key] = r
    winners = [
        {
            "channels": c,
            "height": h,
            "width": w,
            "dtype": "bfloat16",
            "provider": "triton" if r["provider"] == "triton" else "torch",
        }
        for (c, h, w), r in sorted(best.items())
    ]
    return {"measured_on": env["device"], "date": env["date"], "batch": batch, "winners": winners}


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_masked_bn: needs a CUDA device", file=sys.stderr)
        return 2
    env = environment()
    device_slug = env["device"].lower().replace("nvidia ", "").replace(" ", "_")
    out = args.out or Path(__file__).parent / "results" / f"masked_bn_{device_slug}.json"
    results = []
    for batch, shape, pass_, provider in itertools.product(args.batches, SHAPES, args.passes, args.providers):
        r = measure(batch, shape, pass_, provider, args.reps, args.relu)
        results.append(r)
        print(f"N={batch} {shape} {pass_:8s} {provider:9s} {r['median_ms']:.4f} ms {r['gb_per_s']:.0f} GB/s")
    config = {
        "dtype": "bfloat16",
        "layout": "channels_last",
        "training": True,
        "relu": args.relu,
        "reps": args.reps,
    }
    report = {**env, "config": config, "results": results, "ratios": ratios(results)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if args.write_auto_table and "both" in args.passes:
        table = Path(__file__).resolve().parents[1] / "kernels" / "auto_table.json"
        table.write_text(json.dumps(auto_table(results, env), indent=2) + "\n")
        print(f"wrote {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
