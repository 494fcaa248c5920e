"""The GPU probe: every GPU measurement the project needs, in one process tree that fits the device window.

Sections, in the order they run (``--sections`` picks some). The first five are the ones the first
8 minutes of a window must always return; later sections never take their time:

1. env: torch / CUDA / Triton / cuDNN versions, the device, its SMs and memory, a bf16 matrix rate.
2. graphs: Dynamo graph and graph-break counts of the compiled steps (unlearn, recover, train):
   one graph each, as on the CPU. The GPU counts the cases where CUDA differs from the CPU test
   (the fused Triton BatchNorm in every precision and layout) and one bf16 channels_last case per stage.
3. kernel: the masked BatchNorm operator's CUDA and Triton tests and the CUDA-graph step test
   (pytest, in a subprocess).
4. steps: per-step median ms, first-call seconds and peak memory at batch 128 for unlearn and
   recover, eager / CUDA graph / compiled / fused operator / compiled + CUDA graphs (cheapest
   first, each variant a unit of work); writes the ``--bn-kernel auto`` table from the compiled
   recover steps with and without the operator.
5. e2e: the default defense on the CIFAR-shaped workload (`rnp_fast.harness.workloads`), per-epoch
   evaluation off (the first figure), then on; cold and warm, phases, TFLOP/s, fraction of bf16 peak.
6. reference: the reference mode and the fast mode on identical reduced work: per-phase ratios.
7. scoring: batched vs sequential scoring of 19 thresholds over 9,000 + 9,000 images with the
   reference's published masks, bf16 channels_last, same metrics checked.
8. throughput: defenses per hour, several in one process (compiled steps reused).
9. science: a full-width ResNet-18 trained with BadNets on the digits set, defended with 5 seeds,
   and the fast-vs-reference fidelity check (benchmarks/bench_fidelity.py).
10. fused (optional, in whatever time is left): one unlearning and one recovering step of K =
   1, 2, 4, 8, 16 models (the CIFAR ResNet-18, then the demo's) as K sequential steps against one
   step of the K models fused into grouped convolutions (`rnp_fast.models.fused`), each model its
   own batch; and the fused step checked against the separate models' (fp32, within 1e-4).

Time (`rnp_fast.harness.budget`): ``--budget-s`` counts from ``$RNP_PROBE_T0`` (gpu_suite.sh sets
it before installing) or from this process's start. A section whose estimate does not fit what is
left (less the estimates of the first five still to come) is skipped. Every section that compiles
runs in a child process of its own, killed whole at its cap: a deadline can never be caught,
wrapped (torch.compile wraps exceptions raised while it compiles) or swallowed, a compile cut
short poisons nothing, and the next section starts fresh. Inside a section the units of work check
the time left before starting; each saves its results to the section's file, which the probe copies
into its one JSON file (``--out``, written atomically) every few seconds and when the section ends,
so a section cut short keeps what it finished. A section's error (type, message, the traceback's
tail) is recorded and the next section runs. Inductor and Triton compile into fresh private cache
folders, so the first compile is a real cold one; later sections then measure warm. ``--dry-run``
runs the same code on the CPU with tiny sizes in about two minutes (the CUDA-only variants are
recorded as skipped, "no CUDA").

    bash benchmarks/gpu_suite.sh --out "$OUT/gpu_probe.json"        # on the GPU machine
    python benchmarks/gpu_probe.py --dry-run --out /tmp/probe.json   # anywhere
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
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

import torch

from rnp_fast import harness
from rnp_fast.config import AttackConfig, BenchConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig, TrainConfig
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.engine import EngineSettings
from rnp_fast.errors import UserError
from rnp_fast.harness import workloads
from rnp_fast.harness.budget import T0_VARIABLE, Budget, clock_start, run_capped
from rnp_fast.kernels import auto_table
from rnp_fast.outputs import PROBE_RESULT, save_json
from rnp_fast.provenance import provenance, versions

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MASK_FILE = REPO / "tests" / "data" / "reference" / "mask_values.txt"
# the operator's CUDA/Triton tests and the CUDA-graph capture of the recover step
KERNEL_TESTS = [REPO / "tests" / "test_masked_bn_kernel.py", REPO / "tests" / "test_engine.py"]


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
    compile_s: float = 90.0  # a cold Inductor compile of a ResNet-18 training step (40-120 s on a GPU box)
    graph_cases: str = "fused and one per stage"  # or "all", or "one per stage"
    compile_backend: str = "inductor"
    kernel_tests: str = "cuda or triton"  # pytest -k
    workload: str = "cifar"  # rnp_fast.harness.workloads.WORKLOADS: e2e, reference, throughput
    e2e_epochs: tuple[int, int] = (0, 0)  # unlearning, recovering; 0: the workload's (13, 20)
    e2e_repeats: int = 2
    reference_epochs: tuple[int, int] = (2, 2)
    reference_test_images: int | None = 2_000  # the synthetic CIFAR test split's first N (x2 scored)
    reference_rnp: dict = field(default_factory=dict)  # RNPConfig overrides (the dry run's fewer thresholds)
    scoring_workload: str = "cifar"
    scoring_masks: bool = True  # the reference's published masks (else seeded random ones)
    scoring_repeats: int = 3
    scoring_steps: int | None = None  # the first N thresholds only (None: all 19)
    throughput_defenses: int = 20  # at most ...
    throughput_seconds: float = 60.0  # ... and no longer than this
    science_width: float = 1.0
    science_epochs: int = 60
    science_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    science_rnp: dict = field(default_factory=dict)  # RNPConfig overrides (the dry run's 1 + 1 epochs)
    fused_ks: tuple[int, ...] = (1, 2, 4, 8, 16)  # models per fused array
    # name: (width, image side, batch): the CIFAR ResNet-18 and the demo's (width 0.25, digits at 32 px)
    fused_models: dict = field(default_factory=lambda: {"cifar_resnet18": (1.0, 32, 128), "demo": (0.25, 32, 32)})
    fused_variants: tuple[str, ...] = ("eager", "cuda_graphs")  # of the bf16 channels_last step
    fused_rounds: int = 5  # timed rounds (median) after fused_warmup untimed ones
    fused_warmup: int = 3


GPU = Sizes()
DRY = Sizes(
    width=0.125,
    image_size=16,
    step_batch=8,
    step_warmup=1,
    step_rounds=2,
    steps_per_round=2,
    compile_s=1.0,
    graph_cases="one per stage",
    compile_backend="eager",  # Dynamo's graphs without code generation: seconds on the CPU
    kernel_tests="cuda",  # all skipped without CUDA: the subprocess and the counting still run
    workload="demo",
    e2e_epochs=(1, 1),
    e2e_repeats=1,
    reference_epochs=(1, 1),
    reference_test_images=300,  # of the digits' 599: the reduced split's code path, tested
    reference_rnp={"pruning_step": 0.3},  # 4 thresholds: the reference evaluates each on its own
    scoring_workload="demo",
    scoring_masks=False,
    scoring_repeats=1,
    scoring_steps=2,
    throughput_defenses=2,
    throughput_seconds=10.0,
    science_width=0.125,
    science_epochs=1,
    science_seeds=(0,),
    science_rnp={"unlearning_epochs": 0, "recovering_epochs": 1, "pruning_step": 0.3},
    fused_ks=(1, 2),
    fused_models={"cifar_resnet18": (0.125, 16, 8), "demo": (0.125, 16, 8)},
    fused_rounds=1,
    fused_warmup=1,
)


# ----------------------------------------------------------------------------------------------
# The probe: where a section runs, its time, its results
# ----------------------------------------------------------------------------------------------


@dataclass
class Probe:
    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    workdir: Path  # private caches, run directories; removed at the end
    budget: Budget
    ends_at: float  # epoch second this section's cap ends (units of work check it)
    save: Callable[[], None]  # saves the results so far (atomically)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def remaining(self) -> float:
        """Seconds left to this section: to its cap, or to the end of the budget if sooner."""
        return min(self.ends_at, self.budget.deadline()) - time.time()

    def checkpoint(self) -> None:
        self.save()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def describe_error(error: BaseException) -> dict:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return {"type": type(error).__name__, "message": str(error)[:2000], "traceback_tail": text[-3000:]}


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
    timing = harness.measure(lambda: a @ b, repeats=10, device=device, warmup=3)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * n**3 / timing["median_s"] / 1e12}


# ----------------------------------------------------------------------------------------------
# 2. graphs
# ----------------------------------------------------------------------------------------------


def graph_cases(sizes: Sizes) -> list[tuple[str, ...]]:
    from rnp_fast.graph_count import CASES

    if sizes.graph_cases == "all":
        return CASES
    picked = {"unlearn": "torch", "recover": "fused", "train": "torch"}
    one_per_stage = [c for c in CASES if c[1:3] == ("bf16", "channels_last") and c[3] == picked[c[0]]]
    if sizes.graph_cases == "one per stage":
        return one_per_stage
    return [c for c in CASES if c in one_per_stage or c[3] == "fused"]  # the CPU test counts the rest


def section_graphs(probe: Probe, results: dict) -> None:
    for case in graph_cases(probe.sizes):
        results["/".join(case)] = count_graphs(probe, *case)
        probe.checkpoint()
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
    output = probe.workdir / "kernel-tests.log"
    with output.open("w") as sink:  # the test run and every process it starts end at the section's cap
        done = run_capped(command, max(probe.remaining() - 2, 5), cwd=REPO, stdout=sink, stderr=subprocess.STDOUT)
    results.update(returncode=done.returncode, output_tail=output.read_text()[-3000:])
    results.update(junit_counts(junit))
    if done.timed_out:
        raise RuntimeError(f"kernel tests: stopped at the section's cap after {done.seconds:.0f} s")
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
    """(model, step) from the stage builder `rnp_fast.unlearn.unlearn` uses."""
    from rnp_fast.learning import build_stage, unlearn_recipe
    from rnp_fast.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", 10, probe.sizes.width).to(probe.device)
    return model, build_stage(unlearn_recipe(RNPConfig()), model, engine, len(images)).step


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
    first = harness.seconds(lambda: step(images, labels), device)
    for _ in range(sizes.step_warmup):
        step(images, labels)

    def round_of_steps():
        for _ in range(sizes.steps_per_round):
            step(images, labels)

    rounds = [harness.seconds(round_of_steps, device) / sizes.steps_per_round * 1e3 for _ in range(sizes.step_rounds)]
    row = {"first_call_s": first, "median_ms": statistics.median(rounds), "rounds_ms": rounds}
    return {**row, "peak_memory_mib": peak_memory_mib(device)}, model


def section_steps(probe: Probe, results: dict) -> None:
    """Variant by variant in VARIANTS' order (eager first: no compile), both stages each."""
    models = {}
    for stage in STEP_BUILDERS:
        results[stage] = {}
    for name, (fields, stages, needs_cuda) in VARIANTS.items():
        for stage in stages:
            results[stage][name] = step_variant(probe, stage, name, fields, needs_cuda, models)
            probe.checkpoint()
    results["auto_table"] = write_auto_table(probe, results["recover"], models.get("recover"))


def step_variant(probe: Probe, stage: str, name: str, fields: dict, needs_cuda: bool, models: dict) -> dict:
    if needs_cuda and not probe.cuda:
        return {"status": "skipped", "reason": "no CUDA"}
    left, compile_s = probe.remaining(), probe.sizes.compile_s
    if fields.get("compile") and left < compile_s:
        return {"status": "skipped", "reason": f"{left:.0f} s left, a cold compile takes ~{compile_s:.0f} s"}
    log(f"steps: {stage} {name}")
    try:
        row, models[stage] = time_variant(probe, stage, fields)
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
# 5. e2e, 6. reference, 8. throughput: whole defenses (rnp_fast.harness.workloads)
# ----------------------------------------------------------------------------------------------


def bench_config(probe: Probe, epochs: tuple[int, int], **fields) -> BenchConfig:
    device = "cuda" if probe.cuda else "cpu"
    return BenchConfig(
        workload=probe.sizes.workload, device=device, unlearning_epochs=epochs[0], recovering_epochs=epochs[1], **fields
    )


def section_e2e(probe: Probe, results: dict) -> None:
    """Per-epoch evaluation off (the window's one end-to-end figure), then on: each a cold
    defense and warm ones, the warm repeats cut to one when a cold compile would not fit twice."""
    for eval_every in (0, 1):
        repeats = probe.sizes.e2e_repeats if probe.remaining() > 2 * probe.sizes.compile_s else 1
        config = bench_config(probe, probe.sizes.e2e_epochs, eval_every=eval_every, modes="fast", repeats=repeats)
        workdir = probe.workdir / "runs" / f"e2e-{eval_every}"
        cold, warm = workloads.timed_defenses(config, workdir, lambda line, e=eval_every: log(f"e2e {e}: {line}"))
        results[f"eval_every_{eval_every}"] = e2e_row(probe, config, cold, warm, workdir)
        probe.checkpoint()
    results["cold_means"] = (
        "the first defense of its process: Dynamo traces afresh; Inductor's on-disk cache is the probe's "
        "private one, warm where the steps section compiled the same graphs"
    )


def e2e_row(probe: Probe, config: BenchConfig, cold: dict, warm: dict, workdir: Path) -> dict:
    medians = {"fast": harness.medians(warm["fast"])}
    work = workloads.workload_flops(config, workdir)
    return {
        "config": asdict(config),
        "cold_seconds": cold,
        "warm_median_seconds": medians,
        "warm_runs_seconds": warm,
        "flops": work,
        "achieved": workloads.achieved(work, medians["fast"], describe_device(probe.device)),
    }


def section_reference(probe: Probe, results: dict) -> None:
    config = bench_config(probe, probe.sizes.reference_epochs, eval_every=1, repeats=1)
    sizes = probe.sizes
    results["work"] = {"epochs": sizes.reference_epochs, "test_images": sizes.reference_test_images}
    results["work"].update(sizes.reference_rnp)
    phases = results["phases_seconds"] = {}
    for mode in ("fast", "reference"):  # fast first: its compiled steps may need a trace
        log(f"reference section: {mode} mode")
        out = probe.workdir / "runs" / f"reference-{mode}"
        phases[mode] = workloads.defend_once(config, mode, out, sizes.reference_test_images, **sizes.reference_rnp)
        probe.checkpoint()
    results["speedup_reference_over_fast"] = workloads.speedups(phases)


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
        workloads.defend_once(config, "fast", probe.workdir / "runs" / f"throughput-{len(seconds)}")
        seconds.append(time.perf_counter() - tick)
        results.update(defenses=len(seconds), seconds=seconds, total_s=sum(seconds))
        probe.checkpoint()
    results["defenses_per_hour"] = 3600 * len(seconds) / sum(seconds)
    results["defenses_per_hour_after_first"] = 3600 * (len(seconds) - 1) / sum(seconds[1:]) if seconds[1:] else None


# ----------------------------------------------------------------------------------------------
# 7. scoring
# ----------------------------------------------------------------------------------------------


def section_scoring(probe: Probe, results: dict) -> None:
    import bench_scoring

    from rnp_fast.report import read_mask_file

    amp = "bf16" if probe.cuda else "off"
    device = "cuda" if probe.cuda else "cpu"
    run, model = bench_scoring.workload(probe.sizes.scoring_workload, device=device, amp=amp, channels_last=True)
    masks = read_mask_file(str(MASK_FILE)) if probe.sizes.scoring_masks else bench_scoring.random_masks(model)
    steps = bench_scoring.threshold_steps(masks)[: probe.sizes.scoring_steps]
    args = SimpleNamespace(providers="batched,sequential", repeats=probe.sizes.scoring_repeats, batch_size=None)
    timings, metrics = bench_scoring.time_providers(model, steps, run, args)
    results.update(workload=probe.sizes.scoring_workload, amp=amp, channels_last=True, steps=len(steps))
    results["masks"] = str(MASK_FILE.relative_to(REPO)) if probe.sizes.scoring_masks else "seeded random (seed 0)"
    results["images"] = {"clean": len(run.tests.clean.labels), "poisoned": len(run.tests.poisoned.labels)}
    results["timings"] = timings
    results["ratios"] = harness.ratios({p: t["median_s"] for p, t in timings.items()}, "batched")
    results["batched_equals_sequential"] = metrics["batched"] == metrics["sequential"]
    results["max_metric_difference"] = metric_difference(metrics["batched"], metrics["sequential"])


def metric_difference(a: list, b: list) -> float:
    """The largest difference of any metric of any step between two scorings (0: the same)."""
    pairs = [(m.as_dict(), n.as_dict()) for m, n in zip(a, b, strict=True)]  # the figures, not per-image data
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
    results["fidelity"] = science_fidelity(probe)
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
    except Exception as error:
        return {"status": "error", "error": describe_error(error)}
    keep = ("clean_acc_before", "asr_before", "clean_acc_after", "asr_after", "threshold", "pruned", "seconds")
    return {"status": "ok", **{key: summary[key] for key in keep}}


def science_fidelity(probe: Probe) -> dict:
    """Fast defaults against --mode reference on the demo over two seeds (bench_fidelity.py): the
    distributions, the masks' rank correlation and a verdict line (the dry run: tiny, on the CPU)."""
    import bench_fidelity

    log("science: fidelity, fast vs reference over seeds")
    device = "cuda" if probe.cuda else "cpu"
    try:
        return {"status": "ok", **bench_fidelity.fidelity(device, [0, 1], dry_run=probe.args.dry_run)}
    except Exception as error:
        return {"status": "error", "error": describe_error(error)}


# ----------------------------------------------------------------------------------------------
# 10. fused: K defenses' steps as one network (rnp_fast.models.fused)
# ----------------------------------------------------------------------------------------------

FUSED_TOLERANCE = 1e-4  # fp32 with TF32 off, after one step: parameters and running statistics


def section_fused(probe: Probe, results: dict) -> None:
    """Per model and stage: K sequential steps (K separate models, each its own batch) against
    one step of the K models fused, K = 1, 2, 4, ..., in the product's step settings on the
    device (bf16, channels_last on CUDA); and once per model and stage, the fused step's result
    against the separate models' (fp32). Units in order of interest (the CIFAR ResNet-18 first,
    small K first), each skipped when the time it would take (the last unit's, scaled by K) is
    not left: the section never runs past its cap."""
    results["tolerance"] = {"parameters_and_running_stats": FUSED_TOLERANCE, "precision": "fp32, TF32 off"}
    last = {"k": 1, "seconds": 0.0}
    for model, (width, side, batch) in probe.sizes.fused_models.items():
        for stage in ("unlearn", "recover"):
            row = results.setdefault(model, {}).setdefault(stage, {"width": width, "image_side": side, "batch": batch})
            row["equality"] = fused_equality(probe, stage, width, side, batch)
            probe.checkpoint()
            for k in probe.sizes.fused_ks:
                needed = 2 * last["seconds"] * k / last["k"]
                if probe.remaining() < needed:
                    row[f"k{k}"] = {
                        "status": "skipped",
                        "reason": f"{probe.remaining():.0f} s left, ~{needed:.0f} s needed",
                    }
                    continue
                started = time.perf_counter()
                row[f"k{k}"] = fused_unit(probe, stage, k, width, side, batch)
                last.update(k=k, seconds=time.perf_counter() - started)
                probe.checkpoint()


def fused_engine(probe: Probe, variant: str) -> EngineSettings:
    fields = {"amp": torch.bfloat16, "channels_last": True} if probe.cuda else {}
    return EngineSettings(**fields, cuda_graphs=variant == "cuda_graphs")


def fused_batches(probe: Probe, k: int, side: int, batch: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, 3, side, side, generator=generator).to(probe.device) for _ in range(k)]
    labels = [torch.randint(0, 10, (batch,), generator=generator).to(probe.device) for _ in range(k)]
    return images, labels


def fused_unit(probe: Probe, stage: str, k: int, width: float, side: int, batch: int) -> dict:
    """K sequential steps and one fused step, per variant: medians (ms), speed-up, peak memory."""
    from rnp_fast.models.fused import step_array

    log(f"fused: {stage} K={k} width {width}")
    images, labels = fused_batches(probe, k, side, batch)
    unit = {}
    for variant in probe.sizes.fused_variants:
        if variant == "cuda_graphs" and not probe.cuda:
            unit[variant] = {"status": "skipped", "reason": "no CUDA"}
            continue
        try:
            free_memory(probe.device)
            array = step_array(stage, k, "resnet18", width, fused_engine(probe, variant), batch, probe.device)
            timings = {
                "sequential": harness.measure(
                    lambda a=array: a.step_separately(images, labels),
                    probe.sizes.fused_rounds,
                    probe.device,
                    probe.sizes.fused_warmup,
                ),
                "fused": harness.measure(
                    lambda a=array: a.step_fused(images, labels),
                    probe.sizes.fused_rounds,
                    probe.device,
                    probe.sizes.fused_warmup,
                ),
            }
        except Exception as error:  # e.g. out of memory at K=16: the smaller K stand
            unit[variant] = {"status": "error", "error": describe_error(error)}
            continue
        medians = {name: t["median_s"] * 1e3 for name, t in timings.items()}
        unit[variant] = {
            "status": "ok",
            "sequential_ms": medians["sequential"],
            "fused_ms": medians["fused"],
            "speedup_fused_over_sequential": medians["sequential"] / medians["fused"],
            "timings": timings,
            "peak_memory_mib": peak_memory_mib(probe.device),
        }
    return unit


def fused_equality(probe: Probe, stage: str, width: float, side: int, batch: int, k: int = 4) -> dict:
    """One fp32 step of K separate models and of their fused array: the largest differences."""
    from rnp_fast.models.fused import step_array

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 sums, not TF32
    try:
        array = step_array(stage, k, "resnet18", width, EngineSettings(), batch, probe.device)
        images, labels = fused_batches(probe, k, side, batch, seed=1)
        array.step_separately(images, labels)
        array.step_fused(images, labels)
        differences = array.differences()
    except Exception as error:
        return {"status": "error", "error": describe_error(error)}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    within = all(value <= FUSED_TOLERANCE for value in differences.values())
    return {"status": "ok", "k": k, "max_abs_difference": differences, "within_tolerance": within}


# ----------------------------------------------------------------------------------------------
# Running the sections
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """``estimate_s``: typical on an H200 from a cold process; ``cap_s``: the most it may take
    there; ``dry_s``: typical in --dry-run on 2 loaded CPU cores (the dry cap: 4x, >= 120 s).
    ``first``: one of the results the first 8 minutes always return; ``child``: compiles, so it
    runs in a child process killed whole at its cap."""

    run: Callable[[Probe, dict], None]
    estimate_s: float
    cap_s: float
    dry_s: float
    first: bool = False
    child: bool = True


# The H200 estimates, from the dry run's seconds scaled by each section's FLOPs (x ~90 000 for the
# full-width, 32-pixel, batch-128 steps; ~3-10 TFLOP of work in e2e at a few hundred TFLOP/s: seconds)
# plus what does not scale: a process start with CUDA (~10 s), a Dynamo trace of a ResNet-18 step
# (~4 s), a Triton kernel compile (~0.7 s) and a cold Inductor compile of a training step (40-120 s;
# 90 assumed, `Sizes.compile_s`). graphs: 6 traces + ~90 Triton compiles; kernel: ~87 Triton
# compiles, most already cached by graphs; steps: ~10 s of eager variants + 2 cold compiles (unlearn,
# recover) before its later variants (fused, CUDA graphs) check the time left; e2e: a cold defense
# whose steps hit the Inductor cache steps filled (~2 x 20 s) plus its scoring compile, then warm
# defenses of ~5 s. The first five sum to ~430 s: inside 8 minutes with the wrapper's ~30 s install.
SECTIONS = {
    "env": Section(section_env, 15, 60, 2, first=True, child=False),
    "graphs": Section(section_graphs, 90, 150, 30, first=True),
    "kernel": Section(section_kernel, 60, 120, 20, first=True, child=False),
    "steps": Section(section_steps, 190, 300, 30, first=True),
    "e2e": Section(section_e2e, 75, 200, 70, first=True),
    "reference": Section(section_reference, 60, 150, 40),
    "scoring": Section(section_scoring, 40, 120, 40),
    "throughput": Section(section_throughput, 70, 120, 35),
    "science": Section(section_science, 150, 300, 60),  # 60 s (dry: 24 s) of it: the fidelity check
    # optional, last: runs in whatever is left (its units check the time); 45 s is its first units
    "fused": Section(section_fused, 45, 240, 20),
}


def plan(args: argparse.Namespace, name: str, budget: Budget) -> tuple[float, float, str | None]:
    """(estimate, cap, why it is skipped or None): what is left of the budget, less the estimates of
    the first-eight-minutes sections still to come, must hold the estimate."""
    section = SECTIONS[name]
    estimate = section.dry_s if args.dry_run else section.estimate_s
    later = args.section_list[args.section_list.index(name) + 1 :]
    reserved = sum(SECTIONS[n].dry_s if args.dry_run else SECTIONS[n].estimate_s for n in later if SECTIONS[n].first)
    usable = budget.left() - reserved
    cap = args.caps.get(name) or (max(4 * section.dry_s, 120) if args.dry_run else section.cap_s)
    if estimate > usable * (2 if section.first else 1):  # a first section is worth a try at half its time
        kept = f", {reserved:.0f} s kept for the first sections still to come" if reserved else ""
        return estimate, cap, f"estimate {estimate:.0f} s > {budget.left():.0f} s left of --budget-s{kept}"
    return estimate, min(cap, usable), None


def run_section(probe: Probe, report: dict, name: str) -> dict:
    estimate, cap, skip = plan(probe.args, name, probe.budget)
    if skip:
        return {"status": "skipped", "reason": skip}
    entry = report["sections"][name] = {"status": "running", "estimate_s": estimate, "cap_s": cap, "results": {}}
    probe.checkpoint()
    started = time.perf_counter()
    if SECTIONS[name].child:
        entry.update(section_in_child(probe, name, cap, entry))
    else:
        section_probe = replace(probe, ends_at=time.time() + cap)
        entry.update(section_outcome(section_probe, name, entry["results"]))
    entry["seconds"] = time.perf_counter() - started
    return entry


def section_outcome(probe: Probe, name: str, results: dict) -> dict:
    """Run one section's work into ``results``: its status, and its error if it raised."""
    try:
        if name == probe.args.stall_section:
            stall_in_compile(probe, results)
        if name == probe.args.fail_section:
            raise RuntimeError(f"deliberate failure of section {name} (--fail-section)")
        SECTIONS[name].run(probe, results)
        return {"status": "ok"}
    except Exception as error:  # recorded; the next section runs
        return {"status": "error", "error": describe_error(error)}
    finally:
        free_memory(probe.device)


def stall_in_compile(probe: Probe, results: dict) -> None:
    """Tests: a compile that never ends (a backend that sleeps), after saving a first result."""

    def endless_backend(graph, example_inputs):
        time.sleep(3600)
        return graph.forward

    results["stalled"] = "compiling"
    probe.checkpoint()
    torch.compile(lambda x: x * 2, backend=endless_backend, fullgraph=True)(torch.ones(2))


def section_in_child(probe: Probe, name: str, cap: float, entry: dict) -> dict:
    """The section in a fresh process (this script, --section-child), killed whole at ``cap``; its
    results file is copied into the report every few seconds and at the end."""
    path = probe.workdir / "sections" / f"{name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), *probe.args.argv]
    command += ["--section-child", name, "--section-results", str(path), "--section-workdir", str(probe.workdir)]
    command += ["--section-ends-at", repr(time.time() + cap)]
    env = {**os.environ, T0_VARIABLE: repr(probe.budget.started_at)}  # the children's clock is ours

    def copy_results() -> dict:
        child = read_results(path)
        entry["results"] = child.get("results", entry["results"])
        probe.checkpoint()
        return child

    outcome = run_capped(command, cap, on_poll=copy_results, env=env)
    child = copy_results()
    if outcome.timed_out:
        message = f"stopped at its cap of {cap:.0f} s (the process and all it started were killed)"
        return {"status": "timed out", "error": {"type": "SectionCap", "message": message}}
    if child.get("status") in ("ok", "error"):
        return {key: child[key] for key in ("status", "error") if key in child}
    message = f"the section's process exited with code {outcome.returncode} before reporting"
    return {"status": "error", "error": {"type": "ChildExit", "message": message}}


def read_results(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # not written yet
        return {}


def child_main(args: argparse.Namespace, device: torch.device, workdir: Path) -> int:
    """--section-child: one section in this process, its results saved to --section-results."""
    results: dict = {}

    def save(status: str = "running", **outcome) -> None:
        harness.save({"status": status, **outcome, "results": results}, args.section_results, "--section-results")

    budget = Budget(args.budget_s, clock_start())
    probe = Probe(args, device, DRY if args.dry_run else GPU, workdir, budget, args.section_ends_at, save)
    outcome = section_outcome(probe, args.section_child, results)
    save(**outcome)
    return 0 if outcome["status"] == "ok" else 1


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def section_caps(text: str) -> dict[str, float]:
    """--cap-s steps=200,e2e=120: seconds per named section."""
    caps = {}
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        try:
            caps[name] = float(seconds)
        except ValueError:
            raise UserError(f"--cap-s takes NAME=SECONDS,...; got {item!r}") from None
        if name not in SECTIONS or caps[name] <= 0:
            raise UserError(f"--cap-s takes NAME=SECONDS with NAME of {', '.join(SECTIONS)}; got {item!r}")
    return caps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = harness.parser(__doc__, kind=PROBE_RESULT)
    parser.add_argument("--dry-run", action="store_true", help="the CPU with tiny sizes (CI: about two minutes)")
    parser.add_argument("--budget-s", type=float, default=480.0, help=f"seconds from ${T0_VARIABLE} or the start")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma separated, of: {', '.join(SECTIONS)}")
    parser.add_argument("--cap-s", default="", help="NAME=SECONDS,...: a section's cap instead of its own")
    parser.add_argument("--auto-table", type=Path, help="where the steps section writes the auto table")
    parser.add_argument("--fail-section", help=argparse.SUPPRESS)  # tests: make this section fail
    parser.add_argument("--stall-section", help=argparse.SUPPRESS)  # tests: this section's compile never ends
    parser.add_argument("--section-child", help=argparse.SUPPRESS)  # the probe's own child processes
    parser.add_argument("--section-results", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--section-ends-at", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--section-workdir", type=Path, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.argv = argv
    args.section_list = [name for name in args.sections.split(",") if name]
    unknown = set(args.section_list) - set(SECTIONS)
    if unknown or not args.section_list:
        raise UserError(f"--sections takes {', '.join(SECTIONS)}; got {args.sections!r}")
    if args.budget_s <= 0:
        raise UserError(f"--budget-s must be > 0, got {args.budget_s}")
    args.caps = section_caps(args.cap_s)
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


def run_probe(probe: Probe, report: dict) -> None:
    for name in probe.args.section_list:
        log(f"== {name}")
        entry = run_section(probe, report, name)
        report["sections"][name] = entry
        probe.checkpoint()
        log(f"{name}: {entry['status']}" + (f" ({entry['seconds']:.1f} s)" if "seconds" in entry else ""))


def main(argv: list[str] | None = None) -> int:
    """Run the probe; 0 when every section ran or was skipped, 1 when one failed (all recorded)."""
    args = parse_args(argv)
    if args.dry_run:  # a smoke run, not a measurement: one thread cannot be oversubscribed on shared cores
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the processes it starts
    if args.section_child:
        return child_main(args, settle(args, args.section_workdir), args.section_workdir)
    budget = Budget(args.budget_s, clock_start())
    with tempfile.TemporaryDirectory(prefix="rnp-probe-") as tmp:
        workdir = Path(tmp)
        device = settle(args, workdir)
        report = {"benchmark": "gpu probe", **provenance(device), "dry_run": args.dry_run, "budget_s": args.budget_s}
        report.update(started_at=budget.started_at, sizes=asdict(DRY if args.dry_run else GPU), sections={})
        report.update(caches=private_caches(workdir), auto_table_path=str(args.auto_table))
        probe = Probe(args, device, DRY if args.dry_run else GPU, workdir, budget, budget.deadline(), lambda: None)
        probe.save = lambda: save_json(json.loads(json.dumps(report, default=str)), args.out, kind=PROBE_RESULT)
        probe.checkpoint()
        run_probe(probe, report)
        report["total_s"] = budget.spent()
        probe.checkpoint()
    statuses = {name: entry["status"] for name, entry in report["sections"].items()}
    log(f"saved {args.out}: {statuses}")
    return 1 if "error" in statuses.values() else 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    harness.run(cli)
