"""The defense's phases, one group each, whose rows are the ways of doing it (pytest-benchmark):

- scoring the pruning candidates: batched (every candidate in one pass) vs sequential vs the
  reference's (eager fp32, one evaluation per threshold), on the demo model with seeded random
  masks, the first thresholds of the default schedule and the first test images;
- a learning step (unlearning, the demo model at its batch of 32): eager vs torch.compile'd
  (compiling takes tens of seconds on a CPU: marked slow there);
- an epoch of the demo's defense images with augmentation: the device-resident loader vs the
  reference's DataLoader (per-sample CPU transforms);
- one step of K = 4 models (unlearning and recovering) one after another vs as one fused array
  (the demo's width and batch on CUDA; width 0.125 and batch 16 on the CPU).

Each row also checks its result: batched and sequential scoring agree exactly on the CPU, the
reference's (and CUDA's) within 1 % and one image per metric; the compiled step lands where the
eager one does; both loaders give the same batches; the fused step equals the separate ones
(within 1e-4).
"""

import pytest
import torch
from bench_scoring import random_masks, scorer, threshold_steps

from rnp_fast import harness
from rnp_fast.config import RNPConfig
from rnp_fast.data import defense_data
from rnp_fast.engine import EngineSettings
from rnp_fast.harness.workloads import first_test_images
from rnp_fast.learning import build_stage, unlearn_recipe
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.reference_loader import ReferenceLoader
from rnp_fast.models.fused import step_array
from rnp_fast.resolved import resolve_run

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TEST_IMAGES = 2_000 if CUDA else 120  # of the digits' 599 test images (all of them on CUDA)
THRESHOLDS = 19 if CUDA else 4
slow_on_cpu = pytest.mark.slow if not CUDA else []
FUSED_WIDTH, FUSED_BATCH = (0.25, 32) if CUDA else (0.125, 16)


@pytest.fixture(scope="module")
def demo():
    """The demo's job, its run on the first test images, and its backdoored model."""
    job, run = harness.demo_run(device=DEVICE)
    source = first_test_images(job.data, TEST_IMAGES)
    run = resolve_run(job.model, job.data, job.attack, job.engine, reuse=True, source=source)
    return job, run, run.load_model(job.model_path).eval()


@pytest.fixture(scope="module")
def scored(demo):
    """The metrics every scoring variant gave (filled as the rows run; checked against batched)."""
    return {}


@pytest.mark.parametrize("provider", ["batched", "sequential", "reference"])
def test_scoring(benchmark, synced, demo, scored, provider):
    _, run, model = demo
    benchmark.group = "scoring the pruning candidates"
    steps = threshold_steps(random_masks(model))[:THRESHOLDS]
    scored[provider] = benchmark(synced(scorer(model, steps, run, provider)))
    assert len(scored[provider]) == len(steps)
    batched = scored.get("batched")
    if batched is None or provider == "batched":
        return
    if provider == "sequential" and not CUDA:
        assert scored[provider] == batched  # bit for bit on the CPU: the same arithmetic, folded or not
        return
    # the reference's own way (fp32, NCHW, one threshold at a time), or CUDA's kernels per batch shape
    close = 0.01 + 1 / len(run.tests.poisoned.labels)
    for mine, theirs in zip(scored[provider], batched, strict=True):
        assert abs(mine.asr - theirs.asr) <= close and abs(mine.clean_acc - theirs.clean_acc) <= close


def unlearn_step(demo, engine: EngineSettings):
    """(model, step, batch): the demo model's unlearning step under ``engine`` on one batch."""
    job, run, backdoored = demo
    torch.manual_seed(0)
    model = run.new_model()
    model.load_state_dict(backdoored.state_dict())
    images = defense_data(run.source, job.data).train
    loader = DeviceLoader(images, run.source.mean, run.source.std, job.data.batch_size, run.device, seed=0)
    x, y = next(iter(loader))
    stage = build_stage(unlearn_recipe(RNPConfig(**{"unlearning_lr": job.rnp.unlearning_lr})), model, engine, len(y))
    return model, stage.step, (x, y)


@pytest.mark.parametrize(
    "compiled", [pytest.param(False, id="eager"), pytest.param(True, id="compiled", marks=slow_on_cpu)]
)
def test_learning_step(benchmark, synced, demo, compiled):
    benchmark.group = "a learning step (unlearning, demo model)"
    model, step, (x, y) = unlearn_step(demo, EngineSettings(compile=compiled))
    eager_model, eager_step, _ = unlearn_step(demo, EngineSettings())
    step(x, y)  # the compile (or nothing) before the timed calls; both models one step on
    eager_step(x, y)
    for mine, theirs in zip(model.parameters(), eager_model.parameters(), strict=True):
        assert torch.allclose(mine, theirs, atol=1e-4)
    loss, correct = benchmark(synced(step), x, y)
    assert torch.isfinite(loss) and 0 <= correct.item() <= len(y)


@pytest.mark.parametrize("loader", ["device", "dataloader"])
def test_loader_epoch(benchmark, synced, demo, loader):
    job, run, _ = demo
    benchmark.group = "an epoch of defense images (augmented)"
    images = defense_data(run.source, job.data).train
    settings = (run.source.mean, run.source.std, job.data.batch_size, run.device)
    options = {"shuffle": True, "augment": True, "seed": 0}
    make = DeviceLoader if loader == "device" else ReferenceLoader
    made = make(images, *settings, **options)

    def epoch():
        made.set_epoch(1)
        return [(x.to(run.device), y.to(run.device)) for x, y in made]

    batches = benchmark(synced(epoch))
    other = (ReferenceLoader if loader == "device" else DeviceLoader)(images, *settings, **options)
    other.set_epoch(1)
    for (x, y), (ox, oy) in zip(batches, other, strict=True):  # the same seeded order and augmentation
        assert torch.equal(y.cpu(), oy.cpu()) and torch.allclose(x.cpu(), ox.cpu(), atol=1e-5)


@pytest.mark.parametrize("stage", ["unlearn", "recover"])
@pytest.mark.parametrize("way", ["one-at-a-time", "fused"])
def test_fused_array_step(benchmark, synced, stage, way):
    """Four ResNet-18s, each its own batch; the first step of each array is checked against the
    other way (a second array, from the same start), then the steps are timed."""
    benchmark.group = f"one {stage} step of 4 models"
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(FUSED_BATCH, 3, 32, 32, generator=generator).to(DEVICE) for _ in range(4)]
    labels = [torch.randint(0, 10, (FUSED_BATCH,), generator=generator).to(DEVICE) for _ in range(4)]
    array = step_array(stage, 4, "resnet18", FUSED_WIDTH, EngineSettings(), FUSED_BATCH, DEVICE)
    array.step_separately(images, labels)
    array.step_fused(images, labels)
    assert all(value <= 1e-4 for value in array.differences().values())
    benchmark(synced(array.step_fused if way == "fused" else array.step_separately), images, labels)
