"""How many jobs (sweep jobs, repeated defenses) run at once on this machine, and why.

On a CPU one learning step of these small models already runs near the matrix-product rate of
one core (the demo's step: 72 % of a core's fp32 peak with one thread, 61 % with two), so a CPU
gains from jobs side by side, one torch thread each, not from more threads per job: the default
is one job per core available to this process. "Available" is what the process may use, not
what the machine has: its CPU affinity (``taskset``, a batch scheduler's cpuset) and a cgroup CPU
quota (containers) both count.

Memory caps it: every job is a process of its own, with its own copy of the data and the model,
so the jobs must fit in the memory available (``MemAvailable`` of /proc/meminfo, or what the
cgroup's limit leaves, whichever is smaller). A job's need is an estimate (`job_memory`),
on the high side of what was measured (a demo defense's worker peaked at 0.72 GiB, estimated
0.84; training a CIFAR ResNet-18 at batch 128 at 1.66 GiB, estimated 2.6 with its defense): a
process with torch and the data libraries imported, the data set, copies of the model with
gradients and momentum, and the largest batch of activations the job holds (a training batch
kept for the backward pass, or a batch of scoring candidates on a CPU). When fewer jobs fit than were asked
for, fewer run, and the decision says so; when not even one fits, one runs (the estimate is
conservative; refusing would make a job impossible that may well fit).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
PROCESS_BYTES = 450 * 2**20  # a worker with torch, rnp_fast, scikit-learn and matplotlib imported
DATA_COPIES = 2  # the uint8 source, and the poisoned test copies, defense subset and batches made from it
MODEL_COPIES = 12  # backdoored, unlearned, masked, purified; gradients and momentum (fp32)
SAVED_PER_TRAIN_IMAGE = 2  # activations kept for the backward pass, and their gradients
CPU_SCORING_ROWS = 4  # candidate-images per scoring forward on a CPU, per evaluation image
CPU_EVAL_BATCH = 64  # the engine's evaluation batch on a CPU (resolved.eval_batch)
# Images (train + test) of the datasets whose size is known without reading them.
DATASET_IMAGES = {
    "digits": 1_797,
    "cifar10": 60_000,
    "cifar100": 60_000,
    "synthetic-cifar10": 60_000,
    "gtsrb": 51_839,
    "tiny-imagenet": 110_000,
}
UNKNOWN_DATASET_IMAGES = 60_000  # an image folder: counted when it can be, else CIFAR's size


@dataclass(frozen=True)
class Parallelism:
    """How many jobs run at once, and the reason, in words, for the log's first line."""

    jobs: int
    reason: str


def available_cores() -> int:
    """Cores this process may run on: its affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpu_quota() -> int | None:
    """cgroup v2's ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD"), rounded up to whole cores."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, or the cgroup limit less its usage
    if smaller; None where neither can be read (not Linux)."""
    candidates = [value for value in (meminfo_available(), cgroup_memory_left()) if value is not None]
    return min(candidates) if candidates else None


def meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_memory_left(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    try:
        limit = (root / "memory.max").read_text().strip()
        used = int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def job_memory(model, data, device: str = "cpu") -> int:
    """Estimated peak bytes of one job's process defending (or training) ``model`` on ``data``,
    on ``device`` (on a GPU the activations are not in host memory)."""
    from rnp_fast.loaders.sources import NATIVE_SIZE

    per_image, parameters = model_size(model)
    images = dataset_images(data)
    channels, side = 3, data.image_size or NATIVE_SIZE.get(data.dataset, 32)
    data_bytes = DATA_COPIES * images * channels * side * side
    model_bytes = MODEL_COPIES * parameters * 4
    activations = 0
    if not str(device).startswith("cuda"):
        scale = (side / 32) ** 2  # the model's activation count was taken at 32x32
        rows = max(SAVED_PER_TRAIN_IMAGE * data.batch_size, CPU_SCORING_ROWS * CPU_EVAL_BATCH)
        activations = int(rows * per_image * scale * 4)
    return PROCESS_BYTES + data_bytes + model_bytes + activations


def model_size(model) -> tuple[int, int]:
    """(activation values of one 32x32 image's forward, parameters), counted on the meta device
    (no memory, no weights); a model the zoo cannot build counts as a full ResNet-18."""
    import torch

    from rnp_fast.models import ARCHITECTURES, build_model

    arch, width = (model.arch, model.width) if model.arch in ARCHITECTURES else ("resnet18", 1.0)
    with torch.device("meta"):
        network = build_model(arch, 10, width)
    count = [0]
    leaves = [m for m in network.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda _m, _i, out: count.__setitem__(0, count[0] + out.numel())) for m in leaves]
    with torch.no_grad():
        network(torch.empty(1, 3, 32, 32, device="meta"))
    for hook in hooks:
        hook.remove()
    return count[0], sum(p.numel() for p in network.parameters())


def dataset_images(data) -> int:
    """Train + test images of ``data``'s dataset; an image folder's files are counted."""
    if data.dataset in DATASET_IMAGES:
        return DATASET_IMAGES[data.dataset]
    if data.data_dir and Path(data.data_dir).is_dir():
        return sum(len(files) for _, _, files in os.walk(data.data_dir)) or UNKNOWN_DATASET_IMAGES
    return UNKNOWN_DATASET_IMAGES


def decide(
    requested: int | None, cores: int, work: int, per_job: int, memory: int | None, gpus: int = 0, what: str = "jobs"
) -> Parallelism:
    """How many of ``work`` jobs run at once: on ``gpus`` GPUs ``requested`` (the user's
    --jobs-per-device, default 1) on each; without, ``requested`` or one per core of ``cores``;
    at most ``work``, and no more than fit in ``memory`` bytes at ``per_job`` bytes each."""
    if gpus:
        each = requested or 1
        wanted, why = gpus * each, f"{each} per GPU on {gpus} GPU(s)" + (" (--jobs-per-device)" if requested else "")
    elif requested is not None:
        wanted, why = requested, f"as asked (--jobs-per-device {requested})"
    else:
        wanted, why = cores, f"one per core available to this process ({cores})"
    jobs = max(1, min(wanted, work))
    if jobs < wanted:
        why += f", at most the {work} {what} to run"
    if memory is None:
        return Parallelism(jobs, why + "; free memory unknown")
    fit = memory // max(1, per_job)
    need = f"~{per_job / GIB:.2f} GiB each, {memory / GIB:.1f} GiB available"
    if fit >= jobs:
        return Parallelism(jobs, f"{why}; memory fits {fit} ({need})")
    if fit >= 1:
        return Parallelism(fit, f"{why}, reduced from {jobs} to {fit}: memory ({need})")
    cut = f", reduced from {jobs} to 1" if jobs > 1 else ""
    return Parallelism(1, f"{why}{cut}: not even one fits in memory by the estimate, one runs anyway ({need})")
