"""Whole defenses as benchmark workloads: the jobs, their phases, their FLOPs.

- demo: the bundled digits model and data (the demo defense's settings);
- cifar: a seeded random ResNet-18 on synthetic CIFAR-10 data (`rnp_fast.loaders.synthetic_cifar10`):
  speed does not depend on weights or pixels, so `rnp-fast bench --workload cifar` needs no
  dataset and no trained model; the checkpoint is written next to the run directory once.

Both run with fixed epochs (early stop off, so every mode does the same steps) and nothing on the
terminal. Phases come from the run's own timings: data (loading, test-set poisoning, model load),
unlearn and recover (training steps, including the time waiting for batches), evaluation
(per-epoch evaluations, scoring the pruning candidates, the model before and after), other
(writing outputs: masks, tables, plot, purified model), total (the whole run).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from rnp_fast.config import AttackConfig, BenchConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig
from rnp_fast.loaders.sources import DataSource, ImageSet, load_source

PHASES = ("data", "unlearn", "recover", "evaluation", "other", "total")
# Dense bf16 tensor-core peaks (FLOP/s) for the fraction-of-peak figures; unknown devices get none.
BF16_PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def demo_workload(config: BenchConfig, out: str):
    from rnp_fast.demo import demo_job

    job = demo_job(out, EngineConfig(device=config.device, quiet=True))
    return with_bench_settings(job, config, unlearning_epochs=5, recovering_epochs=job.rnp.recovering_epochs)


def cifar_workload(config: BenchConfig, out: str):
    from rnp_fast.checkpoint import save_safetensors
    from rnp_fast.defense import DefendJob
    from rnp_fast.models import build_model

    checkpoint = Path(out).parent / "synthetic-resnet18.safetensors"
    if not checkpoint.exists():
        torch.manual_seed(0)
        save_safetensors(build_model("resnet18", 10).state_dict(), checkpoint, {"arch": "resnet18"})
    job = DefendJob(
        model_path=str(checkpoint),
        out=out,
        model=ModelConfig(arch="resnet18"),
        data=DataConfig(dataset="synthetic-cifar10", ratio=0.01),
        attack=AttackConfig(attack="badnets", label_mode="all2one", target=0),
        rnp=RNPConfig(),
        engine=EngineConfig(device=config.device, quiet=True),
    )
    return with_bench_settings(job, config, unlearning_epochs=13, recovering_epochs=20)


WORKLOADS = {"demo": demo_workload, "cifar": cifar_workload}


def with_bench_settings(job, config: BenchConfig, unlearning_epochs: int, recovering_epochs: int):
    """Fixed epochs (early stop off), the asked per-epoch evaluation, nothing on the terminal."""
    epochs = config.unlearning_epochs or unlearning_epochs
    rnp = replace(
        job.rnp,
        unlearning_epochs=epochs - 1,  # the flag counts the last epoch index (0..N)
        early_stop=False,
        recovering_epochs=config.recovering_epochs or recovering_epochs,
    )
    engine = replace(job.engine, eval_every=config.eval_every, quiet=True)
    return replace(job, rnp=rnp, engine=engine)


def workload_job(config: BenchConfig, out: str | Path, mode: str, **rnp):
    """The workload's job in ``mode`` (reference or fast); ``rnp``: RNPConfig fields to change."""
    job = WORKLOADS[config.workload](config, str(out))
    return replace(job, engine=replace(job.engine, mode=mode), rnp=replace(job.rnp, **rnp))


def first_test_images(data: DataConfig, count: int) -> DataSource:
    """The job's data source with its first ``count`` test images (less scoring work, same code)."""
    source = load_source(data.dataset, data.data_dir, data.download, data.image_size)
    test = ImageSet(source.test.images[:count], source.test.labels[:count])
    return replace(source, test=test)


def defend_once(config: BenchConfig, mode: str, out: str | Path, test_images: int | None = None, **rnp) -> dict:
    """One defense of the workload: its phase seconds and its first steps' seconds. A benchmark
    repeats (``reuse``: compiling pays back); ``test_images``: score only the first N test images."""
    from rnp_fast.defense import run_defense

    job = workload_job(config, out, mode, **rnp)
    source = first_test_images(job.data, test_images) if test_images else None
    summary = run_defense(job, reuse=True, source=source)
    first = {key: summary["timings"].get(key) for key in ("unlearn_first_step", "recover_first_step")}
    return {**phase_seconds(summary), **first}


def timed_defenses(config: BenchConfig, workdir: Path, progress=print) -> tuple[dict, dict]:
    """Each mode's cold (first) defense, then ``config.repeats`` warm ones interleaved between the
    modes so drift hits both alike: ({mode: phases}, {mode: [phases, ...]})."""
    modes = config.mode_list
    cold: dict[str, dict[str, float]] = {}
    warm: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for mode in modes:
        progress(f"{mode}: cold run")
        cold[mode] = phases_of(defend_once(config, mode, workdir / f"{mode}-0"))
    for number in range(1, config.repeats + 1):
        for mode in modes:
            progress(f"{mode}: run {number}/{config.repeats}")
            warm[mode].append(phases_of(defend_once(config, mode, workdir / f"{mode}-{number}")))
    return cold, warm


def phases_of(seconds: dict) -> dict[str, float]:
    return {phase: seconds[phase] for phase in PHASES}


def phase_seconds(summary: dict) -> dict[str, float]:
    timings = summary["timings"]
    phases = {
        "data": timings.get("data", 0.0),
        "unlearn": timings.get("unlearn", 0.0),
        "recover": timings.get("recover", 0.0),
        "evaluation": sum(timings.get(name, 0.0) for name in ("epoch_eval", "prune_eval", "model_eval")),
    }
    # writing outputs (masks, tables, plot, purified model) and choosing the threshold
    phases["other"] = max(0.0, timings["total"] - sum(phases.values()))
    return {**phases, "total": timings["total"]}


def speedups(medians: dict) -> dict[str, float] | None:
    if not {"reference", "fast"} <= medians.keys():
        return None
    return {p: medians["reference"][p] / max(medians["fast"][p], 1e-9) for p in PHASES}


def workload_flops(config: BenchConfig, workdir: Path) -> dict:
    """Model FLOPs of the workload (torch.utils.flop_counter, one forward per image = F):
    unlearning 3F per image-step (forward, input and weight gradients), recovering 2F (forward and
    input gradients: the frozen weights get none; the mask gradients are per channel, negligible),
    evaluation F per scored image (an upper bound for all2one: every test image twice)."""
    from torch.utils.flop_counter import FlopCounterMode

    from rnp_fast.data import defense_data
    from rnp_fast.resolved import resolve_run

    job = WORKLOADS[config.workload](config, str(workdir / "flops"))
    run = resolve_run(job.model, job.data, job.attack, replace(job.engine, device="cpu"))
    model = run.new_model().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, *run.source.image_shape))
    per_image = counter.get_total_flops()
    train_images = len(defense_data(run.source, job.data).train)
    test_images = len(run.source.test.labels) * 2
    epochs = job.rnp.unlearning_epochs + 1 + job.rnp.recovering_epochs
    evaluations = (epochs // config.eval_every if config.eval_every else 0) + 19 + 2
    return {
        "forward_flops_per_image": per_image,
        "unlearn": 3 * per_image * train_images * (job.rnp.unlearning_epochs + 1),
        "recover": 2 * per_image * train_images * job.rnp.recovering_epochs,
        "evaluation_upper_bound": per_image * test_images * evaluations,
    }


def achieved(work: dict, phases: dict[str, float], device_name: str) -> dict:
    """TFLOP/s of training (unlearn + recover) and of the whole defense (an upper bound: the
    evaluation's FLOPs are an upper bound), each with its fraction of the device's bf16 peak."""
    peak = next((value for key, value in BF16_PEAK_FLOPS.items() if key in device_name), None)
    train = (work["unlearn"] + work["recover"]) / max(phases["unlearn"] + phases["recover"], 1e-9) / 1e12
    whole = (work["unlearn"] + work["recover"] + work["evaluation_upper_bound"]) / max(phases["total"], 1e-9) / 1e12
    return {
        "train_tflops": train,
        "fraction_of_bf16_peak": train * 1e12 / peak if peak else None,
        "end_to_end_tflops_upper_bound": whole,
        "end_to_end_fraction_of_bf16_peak": whole * 1e12 / peak if peak else None,
    }
