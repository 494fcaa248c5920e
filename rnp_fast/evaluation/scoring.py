"""Scoring pruning candidates: every step of the schedule evaluated on the test sets.

Three ways, picked by `ScoringOptions`:
- batched (fast mode's default): all candidates in one pass over the data (`candidates`);
- sequential: each distinct prune set loaded into the model and evaluated on its own;
- reference mode: sequential through the reference evaluator, every step re-evaluated even when
  its prune set repeats, as the reference does.
Batched and sequential give the same predictions, bit for bit on CPU (a test).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from rnp_fast.evaluation.candidates import BatchedScoring, PruneSet
from rnp_fast.evaluation.evaluators import make_evaluator
from rnp_fast.evaluation.intervals import Estimate, wilson
from rnp_fast.evaluation.metrics import Metrics, Outputs, accuracy, metrics_from_outputs, per_class_accuracy
from rnp_fast.evaluation.predict import model_input, no_logits, predict
from rnp_fast.evaluation.test_sets import TestSets
from rnp_fast.loaders.augment import normalisation
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.prune import PruneStep, pruned_state_dict
from rnp_fast.runlog import Progress


@dataclass
class ScoringOptions:
    mode: str = "fast"  # fast or reference
    scoring: str = "batched"  # batched or sequential (fast mode)
    batch_size: int = 512
    chunk_size: int = 0  # 0: from free memory
    amp: torch.dtype | None = None
    channels_last: bool = False
    warn: Callable[[str], None] | None = None
    compile_backend: object | None = None  # batched scoring compiled (folded BatchNorms); None: eager, exact
    progress: Callable[[str], None] | None = None  # takes progress lines of a long pass (None: silent)

    @property
    def batched(self) -> bool:
        return self.mode == "fast" and self.scoring == "batched"

    def batched_scoring(self, image_sets: list[torch.Tensor], mean, std) -> BatchedScoring:
        return BatchedScoring(
            image_sets,
            mean,
            std,
            self.batch_size,
            self.chunk_size,
            self.amp,
            self.channels_last,
            self.warn,
            self.compile_backend,
            self.progress,
        )


def prune_set(step: PruneStep) -> PruneSet:
    return frozenset((channel.layer, channel.index) for channel in step.channels)


def score_steps(model: nn.Module, steps: list[PruneStep], data: TestSets, options: ScoringOptions) -> list[Metrics]:
    """Test-set metrics of every step, pruning the original weights of ``model`` (left unchanged)."""
    if options.batched:
        logits = batched_test_logits(model, steps, data, options)
        return [metrics_from_outputs(Outputs(*pair), data) for pair in logits]
    evaluator = make_evaluator(options.mode, data, options.batch_size, options.channels_last, options.amp)
    what = f"scoring the pruning candidates on the test sets: {len(steps)} candidates"
    progress = Progress(options.progress, what, len(steps))
    return score_sequentially(model, steps, evaluator, dedupe=options.mode == "fast", progress=progress)


def batched_test_logits(model: nn.Module, steps: list[PruneStep], data: TestSets, options: ScoringOptions):
    """[clean logits, poisoned logits] per step; a test set the caller did not give (empty: the
    Python API without ``test`` or ``poisoned``) gets empty logits, hence NaN metrics."""
    sets = [data.clean.images, data.poisoned.images]
    present = [images for images in sets if len(images)]
    if not present:
        return [[no_logits(data.device)] * 2 for _ in steps]
    candidates = [prune_set(step) for step in steps]
    scoring = options.batched_scoring(present, data.mean, data.std)
    scored = scoring.score(model, candidates, "scoring the pruning candidates on the test sets")
    return [refill(per_step, sets) for per_step in scored]


def refill(logits: list[torch.Tensor], sets: list[torch.Tensor]) -> list[torch.Tensor]:
    given = iter(logits)
    return [next(given) if len(images) else no_logits(images.device) for images in sets]


def samples_independent(model: nn.Module, images: torch.Tensor, mean, std, count: int = 4) -> bool:
    """Whether ``model``'s eval-mode forward treats samples independently, which batched scoring
    needs (it folds candidates into the batch): a batch of ``count`` images against one at a time.
    Eval-mode BatchNorm with running statistics is per-sample; batch statistics, or layers that
    mix samples, are not. The zoo's models are independent by construction."""
    was_training = model.training
    x = model_input(images[:count], mean, std)
    with torch.no_grad():
        model.eval()
        together = model(x).float()
        alone = torch.cat([model(x[i : i + 1]).float() for i in range(len(x))])
    model.train(was_training)
    scale = together.abs().max().clamp_min(1.0)
    return bool(((together - alone).abs().max() <= 1e-4 * scale).item())


def score_sequentially(
    model: nn.Module, steps: list[PruneStep], evaluator, dedupe: bool = True, progress: Progress | None = None
) -> list:
    """``evaluator`` of every step, one pruned copy of the weights at a time (``model`` restored)."""
    original = {key: value.clone() for key, value in model.state_dict().items()}
    scored: dict[PruneSet, object] = {}
    results = []
    try:
        for step in steps:
            key = prune_set(step)
            if not (dedupe and key in scored):
                model.load_state_dict(pruned_state_dict(original, step.channels))
                scored[key] = evaluator(model)
            results.append(scored[key])
            if progress is not None:
                progress.advance()
    finally:
        model.load_state_dict(original)
    if progress is not None:
        progress.finish()
    return results


@dataclass(frozen=True)
class HoldoutScores:
    """Clean accuracy on the threshold rule's images, overall and within each true class: the
    unpruned model's, then every step's. One scoring pass gives both (the per-class figures are
    the target-class diagnostics', `rnp_fast.diagnostics`). The counts give each its interval."""

    base: float
    per_step: list[float]
    base_per_class: list[float]
    per_step_per_class: list[list[float]]
    n: int = 0  # the rule's images
    base_hits: int = 0  # of them, the unpruned model classifies right
    per_step_hits: list[int] = field(default_factory=list)
    per_class_n: list[int] = field(default_factory=list)  # the rule's images of each class

    def estimate(self, step: int | None = None) -> Estimate:
        """The unpruned model's (``step`` None) or a step's held-out accuracy, with its interval."""
        value, hits = (self.base, self.base_hits) if step is None else (self.per_step[step], self.per_step_hits[step])
        if not self.n:
            return Estimate(None, 0, None, "no images to score")
        return Estimate(value, self.n, wilson(hits, self.n))


def holdout_accuracies(
    model: nn.Module, steps: list[PruneStep], holdout: ImageSet, mean, std, options: ScoringOptions, num_classes: int
) -> HoldoutScores:
    """Clean accuracy on the held-out defense images, overall and per class (``mean``, ``std``:
    numbers or tensors, one per channel)."""
    labels = holdout.labels.to(next(model.parameters()).device)

    def summarise(logits: torch.Tensor) -> tuple[float, list[float], int]:
        hits = int((logits.argmax(1) == labels).sum()) if len(labels) else 0
        return accuracy(logits, labels), per_class_accuracy(logits, labels, num_classes), hits

    scores = step_scores(model, steps, holdout, mean, std, options, summarise)
    return HoldoutScores(
        base=scores[0][0],
        per_step=[s[0] for s in scores[1:]],
        base_per_class=scores[0][1],
        per_step_per_class=[s[1] for s in scores[1:]],
        n=len(labels),
        base_hits=scores[0][2],
        per_step_hits=[s[2] for s in scores[1:]],
        per_class_n=torch.bincount(holdout.labels, minlength=num_classes).tolist(),
    )


def step_scores(
    model: nn.Module, steps: list[PruneStep], images: ImageSet, mean, std, options: ScoringOptions, summarise
) -> list:
    """``summarise(logits)`` on ``images`` of the unpruned ``model``, then of every step (``model``
    left unchanged). Sequential scoring summarises each step's logits at once (only the summaries
    are kept); batched scoring has every candidate's logits anyway."""
    device = next(model.parameters()).device
    data = images.images.to(device)
    mean_t, std_t = normalisation(mean, std, device)
    what = "scoring the pruning candidates on the threshold rule's images"
    if options.batched:
        candidates = [frozenset()] + [prune_set(step) for step in steps]
        scored = options.batched_scoring([data], mean_t, std_t).score(model, candidates, what)
        return [summarise(per_set[0]) for per_set in scored]

    def score(m: nn.Module):
        return summarise(predict(m, data, mean_t, std_t, options.batch_size, options.channels_last, options.amp))

    progress = Progress(options.progress, f"{what}: {len(steps)} candidates x {len(images)} images", len(steps))
    return [score(model), *score_sequentially(model, steps, score, progress=progress)]
