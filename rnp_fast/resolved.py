"""A run, resolved: the configuration sections turned into live objects once, in one place.

`resolve_run` takes the sections (model, data, attack, engine) and returns a `ResolvedRun`: the
device, the concrete engine settings, the data source, the trigger, the normalisation tensors, the
test sets (made on first use), and the factories every stage uses: models, loaders (the
device-resident loader, FFCV, or the reference's DataLoader: the one place a loader is chosen), the
per-model evaluator and the candidate-scoring options. `defend`, `train-backdoor`, `bench`, the
sweep executor (through those) and the benchmark scripts all start here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from rnp_fast.attacks import build_trigger
from rnp_fast.attacks.base import PoisonPlan, Trigger
from rnp_fast.checkpoint import load_model_weights
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig
from rnp_fast.device import resolve_device
from rnp_fast.engine import EngineSettings, resolve_engine
from rnp_fast.errors import UserError
from rnp_fast.evaluation.evaluators import Evaluator, make_evaluator
from rnp_fast.evaluation.predict import predict
from rnp_fast.evaluation.scoring import ScoringOptions, samples_independent
from rnp_fast.evaluation.test_sets import TestSets, build_test_sets
from rnp_fast.loaders.augment import normalisation
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.reference_loader import ReferenceLoader
from rnp_fast.loaders.sources import DataSource, ImageSet, load_source
from rnp_fast.models import build_model
from rnp_fast.models.imported import imported_factory, is_factory_path

ModelFactory = Callable[[type[nn.Module]], nn.Module]  # norm layer class -> a new model


@dataclass(frozen=True)
class ResolvedRun:
    """Frozen: every choice is made in `resolve_run`; what is built lazily (test sets, mean and
    std tensors) is cached, never changed."""

    model: ModelConfig
    data: DataConfig
    attack: AttackConfig
    engine_config: EngineConfig
    device: torch.device
    engine: EngineSettings
    source: DataSource
    trigger: Trigger | None  # None when the caller gives the poisoned test set itself
    build: ModelFactory
    given_tests: TestSets | None = None
    # batched or sequential (the candidate pass), as asked, unless the model needs sequential
    scoring_mode: str = "batched"
    notes: tuple[str, ...] = ()  # warnings of the resolution, for the run's log

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @cached_property
    def mean(self) -> torch.Tensor:
        return normalisation(self.source.mean, self.source.std, self.device)[0]

    @cached_property
    def std(self) -> torch.Tensor:
        return normalisation(self.source.mean, self.source.std, self.device)[1]

    @cached_property
    def tests(self) -> TestSets:
        """The clean and poisoned test sets on the device (poisoned once, on first use)."""
        if self.given_tests is not None:
            return self.given_tests
        attack = self.attack
        return build_test_sets(
            self.source.test,
            self.trigger,
            attack.label_mode,
            attack.target,
            self.num_classes,
            self.source.mean,
            self.source.std,
            self.device,
        )

    def new_model(self, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
        return self.build(norm_layer).to(self.device)

    def load_model(self, path: str, norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
        """A new model with the checkpoint's weights (checked against the architecture, never run)."""
        model = self.build(norm_layer)
        return load_model_weights(model, path, self.model.arch).to(self.device)

    # -- loaders: the one place a loader is chosen --------------------------------------------

    def loader(
        self,
        images: ImageSet,
        shuffle: bool,
        augment: bool,
        seed: int,
        poison: PoisonPlan | None = None,
        beton: str | None = None,
    ):
        """Batches of ``images`` (or of the ``beton`` file holding them) for a learning stage: the
        reference mode's DataLoader, FFCV, or the device-resident loader."""
        settings = (self.source.mean, self.source.std, self.data.batch_size, self.device)
        options = {"shuffle": shuffle, "augment": augment, "seed": seed}
        if self.engine_config.mode == "reference":
            if poison is not None:
                raise UserError("the reference mode reads clean defense data only")
            return ReferenceLoader(images, *settings, **options)
        if beton:
            return self.beton_loader(beton, images, settings, {**options, "poison": poison})
        return DeviceLoader(images, *settings, **options, poison=poison)

    def defense_loader(self, images: ImageSet, seed: int | None = None):
        """The defense data's loader, as the data section asks (shuffle, augmentation, and its
        seed unless ``seed`` is given: a repeat of the defense with other defense data)."""
        return self.loader(images, self.data.shuffle, self.data.augment, self.data.seed if seed is None else seed)

    def beton_loader(self, path: str, images: ImageSet, settings: tuple, options: dict):
        """The FFCV loader of ``path``, checked to hold ``images``' labels in the same order."""
        from rnp_fast.loaders.ffcv_loader import FFCVLoader

        loader = FFCVLoader(path, *settings, **options)
        same_labels = np.array_equal(loader.info.labels, images.labels.numpy())
        if loader.info.image_shape != tuple(images.images.shape[1:]) or not same_labels:
            raise UserError(
                f"{path} does not hold the {self.source.name} training split (make it with rnp-fast convert)"
            )
        return loader

    # -- evaluation ------------------------------------------------------------------------------

    @property
    def eval_batch(self) -> int:
        return min(self.engine.eval_rows or self.data.eval_batch_size, self.data.eval_batch_size)

    def predict(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """float32 logits of ``model`` over uint8 ``images``, as the evaluator computes them
        (the run's normalisation, evaluation batch, layout and precision)."""
        amp, channels_last = self.engine.amp, self.engine.eval_channels_last
        return predict(model, images, self.mean, self.std, self.eval_batch, channels_last, amp)

    def evaluator(self) -> Evaluator:
        """``evaluator(model) -> Metrics`` on both test sets, in the engine's precision and layout."""
        mode = self.engine_config.mode
        return make_evaluator(mode, self.tests, self.eval_batch, self.engine.eval_channels_last, self.engine.amp)

    def epoch_evaluator(self) -> Evaluator:
        """The evaluator of the per-epoch report, in its own precision (`EngineSettings.epoch_eval_amp`)."""
        mode, amp = self.engine_config.mode, self.engine.epoch_eval_amp
        return make_evaluator(mode, self.tests, self.eval_batch, self.engine.eval_channels_last, amp)

    def scoring(self, warn: Callable[[str], None] | None = None) -> ScoringOptions:
        """How pruning candidates are scored (batched or sequential, chunk, precision, layout);
        ``warn`` takes the scoring's warnings (default: Python warnings) and its progress lines."""
        return ScoringOptions(
            mode=self.engine_config.mode,
            scoring=self.scoring_mode,
            batch_size=self.eval_batch,
            chunk_size=self.engine_config.scoring_chunk,
            amp=self.engine.amp,
            channels_last=self.engine.eval_channels_last,
            warn=warn,
            progress=warn,  # the log that takes the warnings takes the progress lines
            # the scoring pass is most of a run's FLOPs: compiled whenever the engine compiles
            compile_backend=self.engine.compile_backend if self.engine.compile else None,
        )


def model_factory(model: ModelConfig, num_classes: int) -> ModelFactory:
    """The zoo's architecture, or the ``package.module:function`` factory ``--arch`` names."""
    if is_factory_path(model.arch):
        return imported_factory(model.arch, model.arch_kwargs)
    return zoo_factory(model, num_classes)


def zoo_factory(model: ModelConfig, num_classes: int) -> ModelFactory:
    def build(norm_layer: type[nn.Module] = nn.BatchNorm2d) -> nn.Module:
        return build_model(model.arch, num_classes, model.width, norm_layer)

    return build


def resolve_run(
    model: ModelConfig,
    data: DataConfig,
    attack: AttackConfig,
    engine: EngineConfig,
    reuse: bool = False,
    source: DataSource | None = None,
    build: ModelFactory | None = None,
    tests: TestSets | None = None,
) -> ResolvedRun:
    """Resolve the sections; ``source``, ``build`` and ``tests`` replace the dataset, the model zoo
    and the test sets built from them (the Python API passes the caller's own). ``reuse``: this
    process runs the same steps again (turns compilation on where it is left to auto)."""
    device = resolve_device(engine.device)
    settings = resolve_engine(engine, device, reuse)
    source = source or load_source(data.dataset, data.data_dir, data.download, data.image_size)
    if tests is None and attack.target >= source.num_classes:
        raise UserError(f"--target {attack.target} is outside the {source.num_classes} classes of {source.name}")
    trigger = None
    if tests is None:
        size = {"image_size": source.image_shape[-1], "channels": source.image_shape[0]}
        trigger = build_trigger(attack.attack, **size, **attack.trigger_params())
    zoo = build is None and not is_factory_path(model.arch)  # staged models: batched scoring by construction
    build = build or model_factory(model, source.num_classes)
    scoring, notes = scoring_mode(engine, build, source, device, zoo)
    return ResolvedRun(model, data, attack, engine, device, settings, source, trigger, build, tests, scoring, notes)


def scoring_mode(engine: EngineConfig, build: ModelFactory, source: DataSource, device, zoo: bool):
    """Batched scoring folds the candidates into the batch, so it needs a model whose eval-mode
    forward treats samples independently: the zoo's staged models do by construction; any other
    model is checked once, on a new copy and a few training images, and scored sequentially if it
    fails (batch dependence comes from the layers, not from their weights)."""
    if engine.mode != "fast" or engine.scoring != "batched" or zoo:
        return engine.scoring, ()
    with torch.random.fork_rng(devices=[]):  # a factory's initialisation must not move the run's RNG
        model = build(nn.BatchNorm2d).to(device)
    if callable(getattr(model, "stages", None)):
        return "batched", ()
    mean, std = normalisation(source.mean, source.std, device)
    if samples_independent(model, source.train.images[:4].to(device), mean, std):
        return "batched", ()
    message = (
        f"{type(model).__name__}'s eval-mode outputs depend on the other samples of a batch, so pruning "
        "candidates are scored sequentially (slower) instead of batched"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return "sequential", (f"WARNING: {message}",)
