"""The GPU probe: every GPU measurement the project needs, in one process that fits the device window.

Sections, in order of value (``--sections`` picks some):

1. env: torch / CUDA / Triton / cuDNN versions, the device, its SMs and memory, a bf16 matrix rate.
2. graphs: Dynamo graph and graph-break counts of every compiled step (unlearn, recover, train),
   each BatchNorm kernel, fp32 and bf16, NCHW and channels_last: one graph each, as on the CPU.
3. kernel: the masked BatchNorm operator's CUDA and Triton tests and the CUDA-graph step test
   (pytest, in a subprocess).
4. steps: per-step median ms, first-call seconds and peak memory at batch 128 for unlearn and
   recover, eager / CUDA graph / compiled / fused operator / compiled + CUDA graphs; writes the
   ``--bn-kernel auto`` table from the compiled recover steps with and without the operator.
5. e2e: the default defense on the CIFAR-shaped workload (`rnp_fast.bench`), per-epoch
   evaluation off and on, cold and warm, phase timings, TFLOP/s and fraction of bf16 peak.
6. reference: the reference mode and the fast mode on identical reduced work: per-phase ratios.
7. sweep: batched vs sequential scoring of 19 thresholds over 9,000 + 9,000 images with the
   reference's published masks, bf16 channels_last, same metrics checked.
8. throughput: defenses per hour, several in one process (compiled steps reused).
9. science: a full-width ResNet-18 trained with BadNets on the digits set, defended with 5 seeds.

One JSON file (``--out``) is written atomically after every section (and at checkpoints inside
the long ones), so a run cut short keeps what it finished. A section's error (type, message, the
traceback's tail) is recorded and the next section runs; a section whose estimate exceeds what is
left of ``--budget-s`` is skipped, and a running one is interrupted when the budget runs out.
Inductor and Triton compile into fresh private cache folders, so the first compile is a real cold
one; later sections then measure warm. ``--dry-run`` runs the same code on the CPU with tiny sizes
in well under a minute (the CUDA-only variants are recorded as skipped, "no CUDA").

    bash benchmarks/gpu_suite.sh --out "$OUT/gpu_probe.json"        # on the GPU machine
    python benchmarks/gpu_probe.py --dry-run --out /tmp/probe.json   # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import _harness
import torch

from rnp_fast.config import AttackConfig, BenchConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig, TrainConfig
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.engine import EngineSettings, apply_engine, sgd
from rnp_fast.errors import UserError
from rnp_fast.kernels import auto_table
from rnp_fast.outputs import save_json
from rnp_fast.provenance import provenance, versions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MASK_FILE = REPO / "tests" / "data" / "reference" / "mask_values.txt"
# the operator's CUDA/Triton tests and the CUDA-graph capture of the recover step
KERNEL_TESTS = [REPO / "tests" / "test_masked_bn_kernel.py", REPO / "tests" / "test_engine.py"]
STARTED = time.perf_counter()  # the budget counts from the start of the process (imports included)


# ----------------------------------------------------------------------------------------------
# Sizes: the GPU's, and the dry run's tiny ones (same code paths)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    width: float = 1.0  # ResNet-18 channel multiplier (graphs, steps)
    image_size: int = 32  # pixels per side (graphs, steps)
    step_batch: int = 128
    step_warmup: int = 5  # untimed steps after the first call
    step_rounds: int = 7  # timed rounds (the median is over these) ...
    steps_per_round: int = 10  # ... of this many steps each, synchronised once per round
    graph_cases: str = "all"  # all, or one case per stage (bf16 channels_last, the fused recover)
    compile_backend: str = "inductor"
    kernel_tests: str = "cuda or triton"  # pytest -k
    workload: str = "cifar"  # rnp_fast.bench.WORKLOADS: e2e, reference, throughput
    e2e_epochs: tuple[int, int] = (0, 0)  # unlearning, recovering; 0: the workload's (13, 20)
    e2e_repeats: int = 2
    reference_epochs: tuple[int, int] = (2, 2)
    reference_test_images: int | None = 2_000  # the synthetic CIFAR test split, clean (x2 scored)
    reference_rnp: dict = field(default_factory=dict)  # RNPConfig overrides (the dry run's fewer thresholds)
    sweep_workload: str = "cifar"
    sweep_masks: bool = True  # the reference's published masks (else seeded random ones)
    sweep_repeats: int = 3
    sweep_steps: int | None = None  # the first N thresholds only (None: all 19)
    throughput_defenses: int = 20  # at most ...
    throughput_seconds: float = 60.0  # ... and no longer than this
    science_width: float = 1.0
    science_epochs: int = 60
    science_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    science_rnp: dict = field(default_factory=dict)  # RNPConfig overrides (the dry run's 1 + 1 epochs)


GPU = Sizes()
DRY = Sizes(
    width=0.125,
    image_size=16,
    step_batch=8,
    step_warmup=1,
    step_rounds=2,
    steps_per_round=2,
    graph_cases="one per stage",
    compile_backend="eager",  # Dynamo's graphs without code generation: seconds on the CPU
    kernel_tests="cuda",  # all skipped without CUDA: the subprocess and the counting still run
    workload="demo",
    e2e_epochs=(1, 1),
    e2e_repeats=1,
    reference_epochs=(1, 1),
    reference_test_images=None,
    reference_rnp={"pruning_step": 0.3},  # 4 thresholds: the reference evaluates each on its own
    sweep_workload="demo",
    sweep_masks=False,
    sweep_repeats=1,
    sweep_steps=2,
    throughput_defenses=2,
    throughput_seconds=10.0,
    science_width=0.125,
    science_epochs=1,
    science_seeds=(0,),
    science_rnp={"unlearning_epochs": 0, "recovering_epochs": 1, "pruning_step": 0.3},
)


# ----------------------------------------------------------------------------------------------
# The probe: its report, the budget, the saved file
# ----------------------------------------------------------------------------------------------


class SectionTimeout(Exception):
    """The budget ran out inside a section."""


@dataclass
class Probe:
    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    workdir: Path  # private caches, run directories; removed at the end
    report: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - STARTED)

    def checkpoint(self) -> None:
        """Save the report now (atomically): a run killed later keeps everything so far. Values JSON
        cannot hold (a dtype, a path) are saved as text rather than lose the file."""
        save_json(json.loads(json.dumps(self.report, default=str)), self.args.out)


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def describe_error(error: BaseException) -> dict:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {"type": type(error).__name__, "message": str(error)[:2000], "traceback_tail": text[-3000:]}


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise SectionTimeout in the main thread after ``seconds`` (where the OS has SIGALRM)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"stopped after {seconds:.0f} s: the section's limit or the end of --budget-s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ----------------------------------------------------------------------------------------------
# 1. env
# ----------------------------------------------------------------------------------------------


def section_env(probe: Probe, results: dict) -> None:
    results.update(versions=versions(), device=describe_device(probe.device), cpu_count=os.cpu_count())
    results["caches"] = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    if probe.cuda:
        props = torch.cuda.get_device_properties(probe.device)
        results.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=props.total_memory / 2**30,
            l2_mib=getattr(props, "L2_cache_size", 0) / 2**20 or None,
            nvidia_smi=nvidia_smi(),
        )
    else:
        results["cuda"] = "no CUDA"
    results["matmul"] = matmul_rate(probe.device)


def nvidia_smi() -> str | None:
    query = "--query-gpu=name,driver_version,clocks.max.sm,clocks.sm,power.limit,temperature.gpu"
    try:
        done = subprocess.run(["nvidia-smi", query, "--format=csv"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def matmul_rate(device: torch.device) -> dict:
    """TFLOP/s of a square matrix product (bf16 8192 on CUDA; fp32 256 on the CPU): the ceiling."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (256, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = _harness.measure(lambda: a @ b, repeats=10, device=device, warmup=3)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / timing["median_s"] / 1e12}


# ----------------------------------------------------------------------------------------------
# 2. graphs
# ----------------------------------------------------------------------------------------------


def graph_cases(sizes: Sizes) -> list[tuple[str, ...]]:
    from rnp_fast.graph_count import CASES

    if sizes.graph_cases == "all":
        return CASES
    picked = {"unlearn": "torch", "recover": "fused", "train": "torch"}
    return [c for c in CASES if c[1:3] == ("bf16", "channels_last") and c[3] == picked[c[0]]]


def section_graphs(probe: Probe, results: dict) -> None:
    for case in graph_cases(probe.sizes):
        results["/".join(case)] = count_graphs(probe, *case)
    rows = [row for row in results.values() if isinstance(row, dict)]
    results["all_match"] = all(row.get("match") for row in rows)


def count_graphs(probe: Probe, stage: str, precision: str, layout: str, kernel: str) -> dict:
    from torch._dynamo.testing import CompileCounter
    from torch._dynamo.utils import counters

    from rnp_fast.graph_count import EPOCHS, EXPECTED_GRAPHS, case_engine, graphs_per_epoch

    counter = CompileCounter()
    engine = case_engine(precision, layout, kernel, counter)
    model = {"device": probe.device, "width": probe.sizes.width, "size": probe.sizes.image_size}
    counters.clear()
    try:
        counts = graphs_per_epoch(stage, engine, counter, "resnet18", **model)
    except Exception as error:  # a graph break under fullgraph=True raises: that is the finding
        return {"match": False, "error": describe_error(error)}
    breaks = sum(counters["graph_break"].values())
    expected = [EXPECTED_GRAPHS[stage]] * EPOCHS
    return {
        "graphs_after_each_epoch": counts,
        "expected": expected,
        "graph_breaks": breaks,
        "match": counts == expected,
    }


# ----------------------------------------------------------------------------------------------
# 3. kernel
# ----------------------------------------------------------------------------------------------


def section_kernel(probe: Probe, results: dict) -> None:
    junit = probe.workdir / "kernel-tests.xml"
    # -P: the working directory's rnp_fast/ (which lacks kernels/ and loaders/) must not shadow the
    # installed package or gpu_suite.sh's PYTHONPATH fallback
    command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    command += [*(str(path.relative_to(REPO)) for path in KERNEL_TESTS), "-k", probe.sizes.kernel_tests]
    results["command"] = " ".join(command)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=max(probe.remaining() - 2, 5))
    results.update(returncode=done.returncode, output_tail=(done.stdout + done.stderr)[-3000:])
    results.update(junit_counts(junit))
    if results["failed"] or results["errors"] or done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"kernel tests: {results['failed']} failed, {results['errors']} errors")


def junit_counts(path: Path) -> dict:
    """Counts and failing test names from pytest's JUnit XML."""
    if not path.is_file():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    cases = list(ElementTree.parse(path).getroot().iter("testcase"))

    def has(case, tag):
        return case.find(tag) is not None

    failing = [f"{c.get('classname')}::{c.get('name')}" for c in cases if has(c, "failure") or has(c, "error")]
    return {
        "passed": sum(not (has(c, "failure") or has(c, "error") or has(c, "skipped")) for c in cases),
        "failed": sum(has(c, "failure") for c in cases),
        "errors": sum(has(c, "error") for c in cases),
        "skipped": sum(has(c, "skipped") for c in cases),
        "failing": failing,
    }


# ----------------------------------------------------------------------------------------------
# 4. steps
# ----------------------------------------------------------------------------------------------

BF16_CL = {"amp": torch.bfloat16, "channels_last": True}
# variant: (EngineSettings fields, the stages it applies to, needs CUDA)
VARIANTS = {
    "eager_fp32_nchw": ({}, ("unlearn", "recover"), False),
    "eager_bf16_channels_last": (BF16_CL, ("unlearn", "recover"), False),
    "eager_cuda_graph": ({**BF16_CL, "cuda_graphs": True}, ("unlearn", "recover"), True),
    "compiled": ({**BF16_CL, "compile": True}, ("unlearn", "recover"), False),
    "compiled_fused_bn": ({**BF16_CL, "compile": True, "bn_kernel": "triton"}, ("recover",), False),
    "compiled_cuda_graphs": ({**BF16_CL, "compile": True, "cuda_graphs": True}, ("unlearn", "recover"), True),
}


def step_batch(probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = probe.sizes.image_size
    images = torch.randn(probe.sizes.step_batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (probe.sizes.step_batch,), generator=generator)
    return images.to(probe.device), labels.to(probe.device)


def unlearn_step(probe: Probe, engine: EngineSettings, images: torch.Tensor):
    """(model, step) as `rnp_fast.unlearn.unlearn` sets them up."""
    from rnp_fast.models import build_model
    from rnp_fast.steps import make_step, unlearn_recipe

    torch.manual_seed(0)
    model = apply_engine(build_model("resnet18", 10, probe.sizes.width).to(probe.device).train(), engine)
    rnp = RNPConfig()
    options = {"lr": rnp.unlearning_lr, "momentum": rnp.momentum, "weight_decay": rnp.weight_decay}
    optimizer = sgd(model.parameters(), probe.device, **options)
    return model, make_step(model, optimizer, unlearn_recipe(), engine, len(images))


def recover_step(probe: Probe, engine: EngineSettings, images: torch.Tensor):
    """(masked model, step) as `rnp_fast.recover.recover` sets them up (bench_masked_bn's)."""
    from bench_masked_bn import recover_step as masked_recover_step

    args = SimpleNamespace(arch="resnet18", num_classes=10, width=probe.sizes.width)
    return masked_recover_step(args, probe.device, engine, images)


STEP_BUILDERS = {"unlearn": unlearn_step, "recover": recover_step}


def time_variant(probe: Probe, stage: str, fields: dict) -> tuple[dict, torch.nn.Module]:
    """First call (compile / capture), then the median of timed rounds, and the peak memory."""
    sizes, device = probe.sizes, probe.device
    engine = EngineSettings(**fields, compile_backend=sizes.compile_backend)
    images, labels = step_batch(probe)
    free_memory(device)
    model, step = STEP_BUILDERS[stage](probe, engine, images)
    first = _harness.seconds(lambda: step(images, labels), device)
    for _ in range(sizes.step_warmup):
        step(images, labels)

    def round_of_steps():
        for _ in range(sizes.steps_per_round):
            step(images, labels)

    rounds = [_harness.seconds(round_of_steps, device) / sizes.steps_per_round * 1e3 for _ in range(sizes.step_rounds)]
    row = {"first_call_s": first, "median_ms": statistics.median(rounds), "rounds_ms": rounds}
    return {**row, "peak_memory_mib": peak_memory_mib(device)}, model


def section_steps(probe: Probe, results: dict) -> None:
    models = {}
    for stage in STEP_BUILDERS:
        results[stage] = {}
        for name, (fields, stages, needs_cuda) in VARIANTS.items():
            if stage not in stages:
                continue
            results[stage][name] = step_variant(probe, stage, name, fields, needs_cuda, models)
            probe.checkpoint()
    results["auto_table"] = write_auto_table(probe, results["recover"], models.get("recover"))


def step_variant(probe: Probe, stage: str, name: str, fields: dict, needs_cuda: bool, models: dict) -> dict:
    if needs_cuda and not probe.cuda:
        return {"status": "skipped", "reason": "no CUDA"}
    log(f"steps: {stage} {name}")
    try:
        row, models[stage] = time_variant(probe, stage, fields)
    except SectionTimeout:
        raise
    except Exception as error:  # one variant's failure (a capture, a kernel) must not hide the others
        return {"status": "error", "error": describe_error(error)}
    if fields.get("bn_kernel") == "triton" and not probe.cuda:
        row["note"] = "CPU: the operator's PyTorch implementation"
    return {"status": "ok", **row}


def write_auto_table(probe: Probe, recover: dict, model) -> dict:
    """The --bn-kernel auto table's case for this device, from the whole compiled recover steps."""
    torch_row, fused_row = recover.get("compiled", {}), recover.get("compiled_fused_bn", {})
    if "median_ms" not in torch_row or "median_ms" not in fused_row:
        return {"status": "skipped", "reason": "the compiled recover steps did not both run"}
    shape = (probe.sizes.step_batch, 3, probe.sizes.image_size, probe.sizes.image_size)
    key = auto_table.case_key(describe_device(probe.device), model, shape, torch.bfloat16)
    settings = {"compile": True, "cuda_graphs": False, "channels_last": True}
    case = {"key": key, "arch": "resnet18", "width": probe.sizes.width, "shape": list(shape), "amp": "bf16"}
    case.update(settings, torch_ms=torch_row["median_ms"], fused_ms=fused_row["median_ms"], source="gpu_probe steps")
    path = auto_table.write_table([case], provenance(probe.device), probe.args.auto_table, "--auto-table")
    return {"status": "ok", "path": str(path), "case": {**case, "winner": auto_table.winner(case)}}


# ----------------------------------------------------------------------------------------------
# 5. e2e, 6. reference, 8. throughput: whole defenses (rnp_fast.bench)
# ----------------------------------------------------------------------------------------------


def bench_config(probe: Probe, epochs: tuple[int, int], **fields) -> BenchConfig:
    device = "cuda" if probe.cuda else "cpu"
    return BenchConfig(
        workload=probe.sizes.workload, device=device, unlearning_epochs=epochs[0], recovering_epochs=epochs[1], **fields
    )


def section_e2e(probe: Probe, results: dict) -> None:
    from rnp_fast.bench import run_bench

    for eval_every in (0, 1):
        # short of time (a slow cold compile before): one warm run, not the planned repeats
        repeats = probe.sizes.e2e_repeats if probe.remaining() > 2 * SECTIONS["e2e"].estimate_s else 1
        config = bench_config(probe, probe.sizes.e2e_epochs, eval_every=eval_every, modes="fast", repeats=repeats)
        bench = run_bench(config, progress=lambda line, e=eval_every: log(f"e2e eval_every={e}: {line}"))
        results[f"eval_every_{eval_every}"] = e2e_row(probe, bench)
        probe.checkpoint()
    results["cold_means"] = (
        "the first defense of this process: Dynamo traces afresh; Inductor's on-disk cache is the probe's "
        "private one, warm where the steps section compiled the same graphs"
    )


def e2e_row(probe: Probe, bench: dict) -> dict:
    from rnp_fast.bench import BF16_PEAK_FLOPS

    keep = ("config", "cold_seconds", "warm_median_seconds", "warm_runs_seconds", "flops", "achieved")
    row = {key: bench[key] for key in keep}
    work = bench["flops"]
    total = bench["warm_median_seconds"]["fast"]["total"]
    tflops = (work["unlearn"] + work["recover"] + work["evaluation_upper_bound"]) / max(total, 1e-9) / 1e12
    name = describe_device(probe.device)
    peak = next((value for key, value in BF16_PEAK_FLOPS.items() if key in name), None)
    row["end_to_end"] = {"tflops_upper_bound": tflops, "fraction_of_bf16_peak": tflops * 1e12 / peak if peak else None}
    return row


@contextlib.contextmanager
def synthetic_test_images(count: int | None):
    """The synthetic CIFAR workload with ``count`` test images (``load_source`` builds it by name;
    both modes read the same, so the work stays identical). None: unchanged."""
    import rnp_fast.loaders.synthetic as synthetic

    original = synthetic.synthetic_cifar10_source
    if count is not None:
        synthetic.synthetic_cifar10_source = lambda **kw: original(**{"test_images": count, **kw})
    try:
        yield
    finally:
        synthetic.synthetic_cifar10_source = original


def defend_once(config: BenchConfig, mode: str, out: Path, **rnp) -> dict:
    """One defense of the bench workload in ``mode`` (``rnp``: RNPConfig overrides): phase seconds
    and the first steps' seconds."""
    from rnp_fast.bench import WORKLOADS, phase_seconds
    from rnp_fast.defense import run_defense

    job = WORKLOADS[config.workload](config, str(out))
    job = replace(job, engine=replace(job.engine, mode=mode), rnp=replace(job.rnp, **rnp))
    summary = run_defense(job, reuse=True)
    first = {key: summary["timings"].get(key) for key in ("unlearn_first_step", "recover_first_step")}
    return {**phase_seconds(summary), **first}


def section_reference(probe: Probe, results: dict) -> None:
    from rnp_fast.bench import speedups

    config = bench_config(probe, probe.sizes.reference_epochs, eval_every=1, repeats=1)
    sizes = probe.sizes
    results["work"] = {
        "epochs": sizes.reference_epochs,
        "test_images": sizes.reference_test_images,
        **sizes.reference_rnp,
    }
    phases = results["phases_seconds"] = {}
    with synthetic_test_images(probe.sizes.reference_test_images):
        for mode in ("fast", "reference"):  # fast first: its compiled steps may need a trace
            log(f"reference section: {mode} mode")
            out = probe.workdir / "runs" / f"reference-{mode}"
            phases[mode] = defend_once(config, mode, out, **probe.sizes.reference_rnp)
            probe.checkpoint()
    results["speedup_reference_over_fast"] = speedups(phases)


def section_throughput(probe: Probe, results: dict) -> None:
    sizes = probe.sizes
    config = bench_config(probe, sizes.e2e_epochs, eval_every=0, modes="fast")
    seconds: list[float] = []
    started = time.perf_counter()
    while len(seconds) < sizes.throughput_defenses:
        spent = time.perf_counter() - started
        next_one = statistics.median(seconds) if seconds else 0.0
        if seconds and (spent + next_one > sizes.throughput_seconds or probe.remaining() < 2 * next_one):
            break
        tick = time.perf_counter()
        defend_once(config, "fast", probe.workdir / "runs" / f"throughput-{len(seconds)}")
        seconds.append(time.perf_counter() - tick)
    results.update(defenses=len(seconds), seconds=seconds, total_s=sum(seconds))
    results["defenses_per_hour"] = 3600 * len(seconds) / sum(seconds)
    results["defenses_per_hour_after_first"] = 3600 * (len(seconds) - 1) / sum(seconds[1:]) if seconds[1:] else None


# ----------------------------------------------------------------------------------------------
# 7. sweep
# ----------------------------------------------------------------------------------------------


def section_sweep(probe: Probe, results: dict) -> None:
    import bench_sweep

    from rnp_fast.report import read_mask_file

    amp = "bf16" if probe.cuda else "off"
    device = "cuda" if probe.cuda else "cpu"
    run, model = bench_sweep.workload(probe.sizes.sweep_workload, device=device, amp=amp, channels_last=True)
    masks = read_mask_file(str(MASK_FILE)) if probe.sizes.sweep_masks else bench_sweep.random_masks(model)
    steps = bench_sweep.threshold_steps(masks)[: probe.sizes.sweep_steps]
    args = SimpleNamespace(providers="batched,sequential", repeats=probe.sizes.sweep_repeats, batch_size=None)
    timings, metrics = bench_sweep.time_providers(model, steps, run, args)
    results.update(workload=probe.sizes.sweep_workload, amp=amp, channels_last=True, steps=len(steps))
    results["masks"] = str(MASK_FILE.relative_to(REPO)) if probe.sizes.sweep_masks else "seeded random (seed 0)"
    results["images"] = {"clean": len(run.tests.clean.labels), "poisoned": len(run.tests.poisoned.labels)}
    results["timings"] = timings
    results["ratios"] = _harness.ratios({p: t["median_s"] for p, t in timings.items()}, "batched")
    results["batched_equals_sequential"] = metrics["batched"] == metrics["sequential"]
    results["max_metric_difference"] = metric_difference(metrics["batched"], metrics["sequential"])


def metric_difference(a: list, b: list) -> float:
    """The largest difference of any metric of any step between two scorings (0: the same)."""
    pairs = [(asdict(m), asdict(n)) for m, n in zip(a, b, strict=True)]
    return max((abs(m[key] - n[key]) for m, n in pairs for key in m), default=0.0)


# ----------------------------------------------------------------------------------------------
# 9. science
# ----------------------------------------------------------------------------------------------


def section_science(probe: Probe, results: dict) -> None:
    from rnp_fast.train import train_backdoor

    sizes = probe.sizes
    device = "cuda" if probe.cuda else "cpu"
    model = ModelConfig("resnet18", sizes.science_width)
    data = DataConfig(dataset="digits", batch_size=32)
    out = probe.workdir / "runs" / "science-model"
    log("science: train-backdoor")
    train = TrainConfig(epochs=sizes.science_epochs, lr=0.05)
    trained = train_backdoor(str(out), model, data, AttackConfig(), train, EngineConfig(device=device, quiet=True))
    results["trained"] = {key: trained[key] for key in ("clean_acc", "asr", "seconds", "images_per_second")}
    results["seeds"] = {}
    for seed in sizes.science_seeds:
        results["seeds"][str(seed)] = science_defense(probe, out / "model.safetensors", model, seed)
        probe.checkpoint()


def science_defense(probe: Probe, checkpoint: Path, model: ModelConfig, seed: int) -> dict:
    """The demo's defense settings (digits, 30 % of it, gentler rates) on the trained model, one seed."""
    from rnp_fast.defense import run_defense
    from rnp_fast.demo import demo_job

    log(f"science: defend, seed {seed}")
    engine = EngineConfig(device="cuda" if probe.cuda else "cpu", quiet=True)
    job = demo_job(str(probe.workdir / "runs" / f"science-defense-{seed}"), engine)
    rnp = replace(job.rnp, **probe.sizes.science_rnp)
    job = replace(job, model_path=str(checkpoint), model=model, data=replace(job.data, seed=seed), rnp=rnp)
    try:
        summary = run_defense(job)
    except SectionTimeout:
        raise
    except Exception as error:
        return {"status": "error", "error": describe_error(error)}
    keep = ("clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "threshold", "pruned", "seconds")
    return {"status": "ok", **{key: summary[key] for key in keep}}


# ----------------------------------------------------------------------------------------------
# Running the sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    run: Callable[[Probe, dict], None]
    estimate_s: float  # on an H200, a cold process (the budget check uses it)
    dry_estimate_s: float  # --dry-run, on 2 CPU cores


SECTIONS = {
    "env": Section(section_env, 10, 1),
    "graphs": Section(section_graphs, 45, 10),
    "kernel": Section(section_kernel, 75, 8),
    "steps": Section(section_steps, 150, 10),
    "e2e": Section(section_e2e, 120, 8),
    "reference": Section(section_reference, 60, 5),
    "sweep": Section(section_sweep, 40, 4),
    "throughput": Section(section_throughput, 70, 5),
    "science": Section(section_science, 90, 6),
}


def run_section(probe: Probe, name: str) -> dict:
    section = SECTIONS[name]
    estimate = section.dry_estimate_s if probe.args.dry_run else section.estimate_s
    remaining = probe.remaining()
    if estimate > remaining:
        return {"status": "skipped", "reason": f"estimate {estimate:.0f} s > {remaining:.0f} s left of --budget-s"}
    entry = probe.report["sections"][name] = {"status": "running", "estimate_s": estimate, "results": {}}
    started = time.perf_counter()
    try:  # a hung section must not take the others' time: at most 3x its estimate (>= 60 s)
        with deadline(min(remaining, max(3 * estimate, 60))):
            if name == probe.args.fail_section:
                raise RuntimeError(f"deliberate failure of section {name} (--fail-section)")
            section.run(probe, entry["results"])
        entry["status"] = "ok"
    except Exception as error:  # recorded; the next section runs
        entry.update(status="error", error=describe_error(error))
    finally:
        entry["seconds"] = time.perf_counter() - started
        free_memory(probe.device)
    return entry


def run_probe(probe: Probe, names: list[str]) -> None:
    for name in names:
        log(f"== {name}")
        entry = run_section(probe, name)
        probe.report["sections"][name] = entry
        probe.checkpoint()
        log(f"{name}: {entry['status']}" + (f" ({entry.get('seconds', 0):.1f} s)" if "seconds" in entry else ""))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _harness.parser(__doc__)
    parser.add_argument("--dry-run", action="store_true", help="the CPU with tiny sizes (CI: under a minute)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for the whole probe (default: 480)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--auto-table", type=Path, help="where the steps section writes the auto table")
    parser.add_argument("--fail-section", help=argparse.SUPPRESS)  # tests: make this section fail
    args = parser.parse_args(argv)
    args.section_list = [name for name in args.sections.split(",") if name]
    unknown = set(args.section_list) - set(SECTIONS)
    if unknown or not args.section_list:
        raise UserError(f"--sections takes {', '.join(SECTIONS)}; got {args.sections!r}")
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be > 0, got {args.budget_s}")
    return args


def device_slug(device: torch.device) -> str:
    return describe_device(device).lower().replace("nvidia ", "").replace(" ", "_")


def settle(args: argparse.Namespace, workdir: Path) -> torch.device:
    """The device and the output paths; the auto table never lands in the package from a dry or CPU run."""
    device = torch.device("cpu") if args.dry_run else resolve_device("cuda")
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    args.out = Path(args.out or RESULTS / f"gpu_probe_{device_slug(device)}_{date}.json")
    default_table = workdir / "auto_table.json" if args.dry_run else args.out.with_suffix(".auto_table.json")
    args.auto_table = args.auto_table or default_table
    if (args.dry_run or device.type != "cuda") and args.auto_table.resolve() == auto_table.TABLE.resolve():
        raise UserError(
            "a dry run's or a CPU's timings do not belong in the package's auto table: pass --auto-table PATH"
        )
    auto_table.vet_table_path(args.auto_table, "--auto-table")  # before any work, like --out
    return device


def private_caches(workdir: Path) -> dict[str, str]:
    """Fresh Inductor and Triton cache folders, set before anything compiles: a real cold compile."""
    caches = {"TORCHINDUCTOR_CACHE_DIR": workdir / "inductor", "TRITON_CACHE_DIR": workdir / "triton"}
    for name, path in caches.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    return {name: str(path) for name, path in caches.items()}


def main(argv: list[str] | None = None) -> int:
    """Run the probe; 0 when every section ran or was skipped, 1 when one failed (all recorded)."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rnp-probe-") as tmp:
        workdir = Path(tmp)
        device = settle(args, workdir)
        caches = private_caches(workdir)
        sizes = DRY if args.dry_run else GPU
        if args.dry_run:  # a smoke run, not a measurement: one thread cannot be oversubscribed on shared cores
            torch.set_num_threads(1)
            os.environ["OMP_NUM_THREADS"] = "1"  # the kernel tests' subprocess
        probe = Probe(args, device, sizes, workdir)
        probe.report = {"benchmark": "gpu probe", **provenance(device), "dry_run": args.dry_run}
        probe.report.update(budget_s=args.budget_s, sizes=asdict(sizes), caches=caches, sections={})
        probe.report["auto_table_path"] = str(args.auto_table)
        probe.checkpoint()
        run_probe(probe, args.section_list)
        probe.report["total_s"] = time.perf_counter() - STARTED
        probe.checkpoint()
    statuses = {name: entry["status"] for name, entry in probe.report["sections"].items()}
    log(f"saved {args.out}: {statuses}")
    return 1 if "error" in statuses.values() else 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _harness.run(cli)
