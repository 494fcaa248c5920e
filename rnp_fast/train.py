"""`train-backdoor`: train a model on a poisoned training set, as an attacker would.

The poisoned images are chosen once from the poisoning seed; the trigger is stamped batch by batch
on the device before augmentation (the same order the reference's static poisoning gives). The
engine section applies as in `defend` (compiled steps, bf16 autocast, channels_last, CUDA graphs).
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from torch import nn

from rnp_fast.attacks import training_plan
from rnp_fast.checkpoint import save_reference_checkpoint, save_safetensors
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, TrainConfig, to_dict
from rnp_fast.engine import EAGER
from rnp_fast.errors import UserError
from rnp_fast.evaluation.metrics import accuracy
from rnp_fast.learning import build_stage, train_recipe
from rnp_fast.loaders.sources import ImageSet
from rnp_fast.outputs import TRAINED_MODEL, RunDirectory, vet_output
from rnp_fast.provenance import provenance
from rnp_fast.resolved import ResolvedRun, resolve_run
from rnp_fast.runlog import RunLog


def fit(model: nn.Module, loader, train: TrainConfig, on_epoch=None, engine=EAGER) -> None:
    """SGD (Nesterov) over ``train.epochs`` epochs of ``loader`` with the configured schedule,
    stepped by the engine's learning step (`learning.build_stage`)."""
    stage = build_stage(train_recipe(train, len(loader)), model, engine, getattr(loader, "batch_size", None))
    for epoch in range(train.epochs):
        stats = stage.epoch(loader, epoch)
        if on_epoch is not None:
            on_epoch(stats)


def harden_poisoned_images(run: ResolvedRun, plan, train: TrainConfig) -> tuple[ImageSet, dict]:
    """Label-consistent attack: train a clean model, then PGD-perturb the images the plan poisons.

    Returns the training set with those images replaced (the trigger is stamped later, batch by
    batch, like any other attack) and a few facts for the summary.
    """
    started = time.perf_counter()
    trigger, source, data = run.trigger, run.source, run.data
    torch.manual_seed(data.seed)
    clean_model = run.new_model()
    loader = run.loader(source.train, shuffle=True, augment=data.augment, seed=data.seed)
    fit(clean_model, loader, replace(train, epochs=trigger.clean_epochs))
    chosen = torch.nonzero(plan.poisoned).flatten()
    originals = source.train.images[chosen].to(run.device)
    labels = source.train.labels[chosen].to(run.device)
    perturbed = trigger.perturb(clean_model, originals, labels, source.mean, source.std, data.eval_batch_size)
    before, after = (accuracy(run.predict(clean_model, images), labels) for images in (originals, perturbed))
    images = source.train.images.clone()
    images[chosen] = perturbed.cpu()
    facts = {
        "clean_model_epochs": trigger.clean_epochs,
        "eps": trigger.eps,
        "steps": trigger.steps,
        "clean_model_acc_on_poisoned_before_pgd": before,
        "clean_model_acc_on_poisoned_after_pgd": after,
        "seconds": time.perf_counter() - started,
    }
    return ImageSet(images, source.train.labels), facts


def poisoning_plan(run: ResolvedRun, attack: AttackConfig):
    """Which training images carry the trigger and with which label; None for --no-poison (the
    clean baseline: the same data, order and augmentation, nothing stamped)."""
    if not attack.poison:
        return None
    labels = run.source.train.labels
    return training_plan(
        run.trigger, labels, attack.poison_rate, attack.label_mode, attack.target, run.num_classes, attack.poison_seed
    )


def train_backdoor(
    out: str,
    model_cfg: ModelConfig,
    data: DataConfig,
    attack: AttackConfig,
    train: TrainConfig,
    engine: EngineConfig | None = None,
    reuse: bool = False,
) -> dict:
    """Train ``out``/model.safetensors on the poisoned training set; returns the summary. ``reuse``:
    this process trains or defends again (a sweep), where compiling the step pays back."""
    engine = engine or EngineConfig()
    reads = [data.data_dir, train.train_beton, *attack.files()]
    vet_output(out, reads, kind=TRAINED_MODEL)  # before any work: never replace what rnp-fast did not make
    run = resolve_run(model_cfg, data, attack, engine, reuse=reuse)
    plan = poisoning_plan(run, attack)
    hardened = plan is not None and getattr(run.trigger, "needs_clean_model", False)
    if hardened and train.train_beton:
        raise UserError(f"--train-beton cannot carry the {attack.attack} attack's PGD-hardened images; drop it")
    options = {"shuffle": True, "augment": data.augment, "seed": data.seed, "poison": plan}
    hardening = {}
    if hardened:
        train_set, hardening = harden_poisoned_images(run, plan, train)
        loader = run.loader(train_set, **options)
    else:
        loader = run.loader(run.source.train, beton=train.train_beton, **options)  # a bad .beton fails here
    torch.manual_seed(data.seed)
    model = run.new_model()
    started = time.perf_counter()
    with RunDirectory(out, reads, kind=TRAINED_MODEL) as directory:
        log = RunLog(directory.path("train.log"), engine.quiet)
        log.info(f"engine: {run.engine.describe()}; {'; '.join(run.engine.reasons)}")
        if hardening:
            log.info(f"label-consistent: {hardening}")
        bar = log.bar(train.epochs, "training")

        def on_epoch(stats):
            log.info(f"epoch {stats.epoch} \t lr {stats.lr:.4f} \t loss {stats.loss:.4f} \t acc {stats.acc:.4f}")
            bar.update(1)

        fit(model, loader, train, on_epoch, run.engine)
        bar.close()
        metrics = run.evaluator()(model)
        clean, asr = metrics.estimate("clean_acc_full"), metrics.estimate("asr")
        log.info(f"clean {clean.text()}, ASR {asr.text()} (95 % intervals)")
        log.close()
        state = model.state_dict()
        save_safetensors(
            state, directory.path("model.safetensors"), {"arch": model_cfg.arch, "width": str(model_cfg.width)}
        )
        save_reference_checkpoint(state, directory.path("model.pth"), epoch=train.epochs, arch=model_cfg.arch)
        summary = {
            **clean.fields("clean_acc"),  # clean_acc, clean_acc_n, clean_acc_ci95 (full test set)
            **metrics.estimate("clean_acc").fields("clean_acc_non_target"),
            **asr.fields("asr"),
            "poisoned_images": int(plan.poisoned.sum()) if plan is not None else 0,
            "noise_mode_images": int(plan.noise.sum()) if plan is not None and plan.noise is not None else 0,
            **({"label_consistent": hardening} if hardening else {}),
            "seconds": time.perf_counter() - started,
            "images_per_second": train.epochs * loader.num_images / (time.perf_counter() - started),
            **to_dict(model_cfg, data, attack, train, engine),
            **provenance(run.device),
        }
        directory.write_json("summary.json", summary)
    return summary
