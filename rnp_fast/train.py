"""`train-backdoor`: train a model on a poisoned training set, as an attacker would.

The poisoned images are chosen once from the poisoning seed; the trigger is stamped batch by batch
on the device before augmentation (the same order the reference's static poisoning gives).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnp_fast import __version__
from rnp_fast.attacks import build_trigger, training_plan
from rnp_fast.checkpoint import save_reference_checkpoint, save_safetensors
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, doc, require, to_dict
from rnp_fast.device import describe_device, resolve_device
from rnp_fast.engine import EAGER, EngineSettings, compiled, prepare_model, resolve_engine, sgd, to_layout
from rnp_fast.errors import UserError
from rnp_fast.evaluate import build_test_sets, evaluate, predict
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.sources import ImageSet, load_source
from rnp_fast.loops import current_lr, run_epoch
from rnp_fast.models import build_model
from rnp_fast.outputs import RunDirectory, vet_output
from rnp_fast.runlog import RunLog


@dataclass
class TrainConfig:
    epochs: int = doc("training epochs", default=40)
    lr: float = doc("peak SGD learning rate", default=0.1)
    momentum: float = doc("SGD momentum", default=0.9)
    weight_decay: float = doc("SGD weight decay", default=5e-4)
    lr_schedule: str = doc("onecycle, cosine or multistep (x0.1 at 1/2 and 3/4 of training)", default="onecycle")
    train_beton: str | None = doc(
        "read the training split through FFCV from this .beton (rnp-fast convert DATASET OUT.beton)", default=None
    )

    def __post_init__(self):
        require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(
            self.lr_schedule in ("onecycle", "cosine", "multistep"),
            f"--lr-schedule must be onecycle, cosine or multistep, got {self.lr_schedule!r}",
        )


def make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    if config.lr_schedule == "onecycle":  # short warm-up then annealing: fast, stable training
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    milestones = [int(total * 0.5), int(total * 0.75)]
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


def train_step(model: nn.Module, optimizer, scheduler, engine: EngineSettings = EAGER):
    forward = compiled(model, engine)
    device = next(model.parameters()).device

    def step(images, labels):
        with engine.autocast(device):
            logits = forward(to_layout(images, engine))
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.detach() * len(labels), (logits.argmax(1) == labels).sum()

    return step


def fit(model: nn.Module, loader: DeviceLoader, train: TrainConfig, on_epoch=None, engine=EAGER) -> None:
    """SGD (Nesterov) over ``train.epochs`` epochs of ``loader`` with the configured schedule; on
    CUDA the engine's fast settings (compiled step, bf16 autocast, channels_last, fused SGD)."""
    prepare_model(model, engine)
    optimizer = sgd(
        model.parameters(),
        next(model.parameters()).device,
        lr=train.lr,
        momentum=train.momentum,
        weight_decay=train.weight_decay,
        nesterov=True,
    )
    scheduler = make_scheduler(optimizer, train, len(loader))
    step = train_step(model, optimizer, scheduler, engine)
    for epoch in range(train.epochs):
        loader.set_epoch(epoch)
        model.train()
        stats = run_epoch(loader, step, loader.num_images, epoch, current_lr(optimizer))
        if on_epoch is not None:
            on_epoch(stats)


def harden_poisoned_images(trigger, plan, source, model_cfg, data, train, device) -> tuple[ImageSet, dict]:
    """Label-consistent attack: train a clean model, then PGD-perturb the images the plan poisons.

    Returns the training set with those images replaced (the trigger is stamped later, batch by
    batch, like any other attack) and a few facts for the summary.
    """
    started = time.perf_counter()
    torch.manual_seed(data.seed)
    clean_model = build_model(model_cfg.arch, source.num_classes, model_cfg.width).to(device)
    loader = DeviceLoader(
        source.train,
        source.mean,
        source.std,
        data.batch_size,
        device,
        shuffle=True,
        augment=data.augment,
        seed=data.seed,
    )
    fit(clean_model, loader, replace(train, epochs=trigger.clean_epochs))
    chosen = torch.nonzero(plan.poisoned).flatten()
    originals = source.train.images[chosen].to(device)
    labels = source.train.labels[chosen].to(device)
    perturbed = trigger.perturb(clean_model, originals, labels, source.mean, source.std, data.eval_batch_size)
    with torch.no_grad():
        before = (predict_labels(clean_model, originals, source) == labels).float().mean().item()
        after = (predict_labels(clean_model, perturbed, source) == labels).float().mean().item()
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


def beton_loader(path: str, source, batch_size: int, device, options: dict):
    """The FFCV loader of ``path``, checked to hold the source's training split in the source's order."""
    from rnp_fast.loaders.ffcv_loader import FFCVLoader

    loader = FFCVLoader(path, source.mean, source.std, batch_size, device, **options)
    same_labels = np.array_equal(loader.info.labels, source.train.labels.numpy())
    if loader.info.image_shape != source.image_shape or not same_labels:
        raise UserError(f"{path} does not hold the {source.name} training split (make it with rnp-fast convert)")
    return loader


def predict_labels(model: nn.Module, images: torch.Tensor, source) -> torch.Tensor:
    mean = torch.tensor(source.mean, device=images.device)
    std = torch.tensor(source.std, device=images.device)
    return predict(model, images, mean, std, 512).argmax(1)


def train_backdoor(
    out: str,
    model_cfg: ModelConfig,
    data: DataConfig,
    attack: AttackConfig,
    train: TrainConfig,
    device_name: str = "auto",
    quiet: bool = False,
) -> dict:
    reads = [data.data_dir, train.train_beton, *attack.files()]
    vet_output(out, reads)  # before any work: never replace what rnp-fast did not make
    device = resolve_device(device_name)
    source = load_source(data.dataset, data.data_dir, data.download, data.image_size)
    if attack.target >= source.num_classes:
        raise UserError(f"--target {attack.target} is outside the {source.num_classes} classes of {source.name}")
    image_shape = {"image_size": source.image_shape[-1], "channels": source.image_shape[0]}
    trigger = build_trigger(attack.attack, **image_shape, **attack.trigger_params())
    # --no-poison, the clean baseline: the same data, order and augmentation, nothing stamped.
    plan = None
    if attack.poison:
        plan = training_plan(
            trigger,
            source.train.labels,
            attack.poison_rate,
            attack.label_mode,
            attack.target,
            source.num_classes,
            attack.poison_seed,
        )
    hardened = plan is not None and getattr(trigger, "needs_clean_model", False)
    if hardened and train.train_beton:
        raise UserError(f"--train-beton cannot carry the {attack.attack} attack's PGD-hardened images; drop it")
    options = {"shuffle": True, "augment": data.augment, "seed": data.seed, "poison": plan}
    if train.train_beton:  # checked before the run directory exists
        loader = beton_loader(train.train_beton, source, data.batch_size, device, options)
    train_set, hardening = source.train, {}
    if hardened:
        train_set, hardening = harden_poisoned_images(trigger, plan, source, model_cfg, data, train, device)
    torch.manual_seed(data.seed)
    model = build_model(model_cfg.arch, source.num_classes, model_cfg.width).to(device)
    if not train.train_beton:
        loader = DeviceLoader(train_set, source.mean, source.std, data.batch_size, device, **options)
    tests = build_test_sets(
        source.test,
        trigger,
        attack.label_mode,
        attack.target,
        source.num_classes,
        source.mean,
        source.std,
        device,
    )
    started = time.perf_counter()
    with RunDirectory(out, reads, kind="trained model") as run:
        log = RunLog(run.path("train.log"), quiet)
        if hardening:
            log.info(f"label-consistent: {hardening}")
        bar = log.bar(train.epochs, "training")

        def on_epoch(stats):
            log.info(f"epoch {stats.epoch} \t lr {stats.lr:.4f} \t loss {stats.loss:.4f} \t acc {stats.acc:.4f}")
            bar.update(1)

        engine = resolve_engine(EngineConfig(device=device_name), device)
        log.info(f"engine: {engine.describe()}")
        fit(model, loader, train, on_epoch, engine)
        bar.close()
        metrics = evaluate(model, tests, data.eval_batch_size)
        log.info(f"clean {metrics.clean_acc_full:.4f}, ASR {metrics.asr:.4f}")
        log.close()
        state = model.state_dict()
        save_safetensors(state, run.path("model.safetensors"), {"arch": model_cfg.arch, "width": str(model_cfg.width)})
        save_reference_checkpoint(state, run.path("model.pth"), epoch=train.epochs, arch=model_cfg.arch)
        summary = {
            "clean_acc": metrics.clean_acc_full,
            "clean_acc_non_target": metrics.clean_acc,
            "asr": metrics.asr,
            "poisoned_images": int(plan.poisoned.sum()) if plan is not None else 0,
            "noise_mode_images": int(plan.noise.sum()) if plan is not None and plan.noise is not None else 0,
            **({"label_consistent": hardening} if hardening else {}),
            "seconds": time.perf_counter() - started,
            "images_per_second": train.epochs * loader.num_images / (time.perf_counter() - started),
            "device": describe_device(device),
            "rnp_fast": __version__,
            "torch": torch.__version__,
            **to_dict(model_cfg, data, attack, train),
        }
        run.write_json("summary.json", summary)
    return summary
