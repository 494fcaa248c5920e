"""The batched candidate scoring (all pruning candidates in one pass) against the sequential path."""

from __future__ import annotations

import pytest
import torch
from tests_support import TINY_WIDTH
from torch._dynamo.testing import CompileCounter

from rnp_fast.attacks import build_trigger
from rnp_fast.checkpoint import load_model_weights
from rnp_fast.demo import DEMO_MODEL, demo_checkpoint
from rnp_fast.evaluation import candidates
from rnp_fast.evaluation.candidates import BatchedScoring, CandidateNetwork
from rnp_fast.evaluation.scoring import ScoringOptions, holdout_accuracies, score_steps
from rnp_fast.evaluation.test_sets import build_test_sets
from rnp_fast.loaders.sources import ImageSet, load_source
from rnp_fast.models import ARCHITECTURES, build_model
from rnp_fast.models.stages import model_stages, run_stages
from rnp_fast.prune import Channel, rank_channels, threshold_steps, thresholds

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo_model():
    model = build_model(DEMO_MODEL.arch, 10, DEMO_MODEL.width)
    return load_model_weights(model, demo_checkpoint(), DEMO_MODEL.arch).eval()


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


def cut_test_sets(source, images_per_set: int):
    """The demo's test sets cut to ``images_per_set`` images (CPU time), poisoned with BadNets."""
    small = ImageSet(source.test.images[:images_per_set], source.test.labels[:images_per_set])
    trigger = build_trigger("badnets", image_size=32, channels=3)
    return build_test_sets(small, trigger, "all2one", 0, 10, source.mean, source.std, CPU)


def random_masks(model, seed: int = 0) -> list[Channel]:
    """Mask values spread over every BatchNorm (the hard case for prefix sharing), 10% exactly 0
    as clamped masks often are."""
    generator = torch.Generator().manual_seed(seed)
    channels = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            values = torch.rand(module.num_features, generator=generator)
            values[torch.rand(module.num_features, generator=generator) < 0.1] = 0.0
            channels += [Channel(name, index, float(v)) for index, v in enumerate(values)]
    return channels


@pytest.mark.parametrize(
    ("levels", "images"), [(thresholds(0.90, 0.05), 96), ([i * 0.01 for i in range(101)], 24)], ids=["19", "101"]
)
def test_batched_equals_sequential_on_demo_model(demo_model, digits, levels, images):
    data = cut_test_sets(digits, images)
    steps = threshold_steps(rank_channels(random_masks(demo_model)), levels)
    sequential = score_steps(demo_model, steps, data, ScoringOptions(scoring="sequential", batch_size=64))
    batched = score_steps(demo_model, steps, data, ScoringOptions(scoring="batched", batch_size=64))
    assert batched == sequential  # every metric, bit for bit: identical predictions and losses


def test_holdout_accuracies_agree(demo_model, digits):
    steps = threshold_steps(rank_channels(random_masks(demo_model, seed=1)), thresholds(0.9, 0.1))
    holdout = ImageSet(digits.train.images[:40], digits.train.labels[:40])
    results = [
        holdout_accuracies(demo_model, steps, holdout, digits.mean, digits.std, ScoringOptions(scoring=mode), 10)
        for mode in ("sequential", "batched")
    ]
    assert repr(results[0]) == repr(results[1])  # exact; repr because NaN (a class with no image) != NaN


def test_model_is_left_unchanged(demo_model, digits):
    before = {k: v.clone() for k, v in demo_model.state_dict().items()}
    steps = threshold_steps(rank_channels(random_masks(demo_model)), [0.5])
    score_steps(demo_model, steps, cut_test_sets(digits, 8), ScoringOptions())
    assert all(torch.equal(before[k], v) for k, v in demo_model.state_dict().items())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_stages_compose_to_forward(arch):
    model = build_model(arch, 10, TINY_WIDTH).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(run_stages(model_stages(model), x), model(x))


def test_prefix_sharing_groups_candidates_until_they_differ():
    model = build_model("resnet18", 10, TINY_WIDTH)
    network = CandidateNetwork(model)
    last = "layer4.1.bn2"
    candidates = [frozenset(), frozenset({(last, 0)}), frozenset({(last, 0), (last, 1)})]
    plan = network.plan(candidates)
    first_split = next(i for i, stage in enumerate(plan.stages) if stage.parent is not None)
    assert first_split == network.stage_of_norm[last]  # everything before runs once for all three
    assert plan.stages[first_split].parent.tolist() == [0, 0, 0]
    assert plan.group_of_candidate == [0, 1, 2]


def test_identical_prune_sets_are_scored_once(demo_model, digits, monkeypatch):
    seen = []
    original = CandidateNetwork.plan
    monkeypatch.setattr(CandidateNetwork, "plan", lambda self, sets: seen.append(len(sets)) or original(self, sets))
    data = cut_test_sets(digits, 8)
    chosen = frozenset({("layer4.1.bn2", 3)})
    scoring = BatchedScoring([data.clean.images], data.mean, data.std, batch_size=8)
    logits = scoring.score(demo_model, [chosen, frozenset(), chosen, chosen])
    assert seen == [2]
    assert torch.equal(logits[0][0], logits[2][0])


def test_out_of_memory_halves_the_chunk_and_continues(demo_model, digits, monkeypatch):
    data = cut_test_sets(digits, 16)
    steps = threshold_steps(rank_channels(random_masks(demo_model)), thresholds(0.9, 0.1))
    expected = score_steps(demo_model, steps, data, ScoringOptions(batch_size=16))
    original = CandidateNetwork.forward

    def forward_with_small_memory(self, plan, x):
        if len(plan.group_of_candidate) > 2:  # pretend the device holds at most two candidates
            raise candidates.OUT_OF_MEMORY[0]("CUDA out of memory (simulated)")
        return original(self, plan, x)

    monkeypatch.setattr(CandidateNetwork, "forward", forward_with_small_memory)
    warnings = []
    options = ScoringOptions(batch_size=16, warn=warnings.append)
    retried = score_steps(demo_model, steps, data, options)
    # Halving changes the rows per forward (candidates x images), and on some CPUs
    # (an Intel Xeon here, also at the commit before the redesign) oneDNN convolves a few rows
    # with another algorithm than many: the losses move in the last bits, predictions do not
    for got, want in zip(retried, expected, strict=True):
        assert (got.clean_acc, got.asr, got.robust_acc) == (want.clean_acc, want.asr, want.robust_acc)
        assert got.clean_loss == pytest.approx(want.clean_loss, rel=1e-5)
        assert got.poison_loss == pytest.approx(want.poison_loss, rel=1e-5)
    assert any("out of memory" in message for message in warnings)
    assert "2 candidates" in warnings[-1]


@pytest.mark.heavy
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compiled_scoring_folds_pruning_into_scale_and_shift(demo_model, digits, channels_last):
    """Compiled scoring (the GPU's) folds each group's pruning into its BatchNorm scale and shift:
    one graph per stage for the whole pass (no break, no recompile per group count beyond the
    first change of shape), predictions equal to the exact way, logits to float rounding."""
    data = cut_test_sets(digits, 24)
    steps = threshold_steps(rank_channels(random_masks(demo_model)), thresholds(0.9, 0.1))
    image_sets = [data.clean.images, data.poisoned.images]
    prune_sets = [frozenset((c.layer, c.index) for c in step.channels) for step in steps]
    exact = BatchedScoring(image_sets, data.mean, data.std, 64, channels_last=channels_last).score(
        demo_model, prune_sets
    )
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = BatchedScoring(
        image_sets, data.mean, data.std, 64, channels_last=channels_last, compile_backend=counter
    ).score(demo_model, prune_sets)
    stages = len(model_stages(demo_model))
    assert stages <= counter.frame_count <= 2 * stages  # static first, then dynamic in the group count
    for per_set_exact, per_set_compiled in zip(exact, compiled, strict=True):
        for want, got in zip(per_set_exact, per_set_compiled, strict=True):
            assert torch.equal(want.argmax(1), got.argmax(1))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_scoring_gives_the_exact_predictions(digits):
    """The real compiler on the folded scoring (the GPU's default when compiling), on a tiny model."""
    model = build_model("resnet18", 10, TINY_WIDTH).eval()
    data = cut_test_sets(digits, 16)
    steps = threshold_steps(rank_channels(random_masks(model)), thresholds(0.9, 0.3))
    prune_sets = [frozenset((c.layer, c.index) for c in step.channels) for step in steps]
    image_sets = [data.clean.images]
    exact = BatchedScoring(image_sets, data.mean, data.std, 32).score(model, prune_sets)
    compiled = BatchedScoring(image_sets, data.mean, data.std, 32, compile_backend="inductor").score(model, prune_sets)
    for want, got in zip(exact, compiled, strict=True):
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
