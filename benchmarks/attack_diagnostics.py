"""Why an attack does or does not implant: per-class clean accuracy and where the trigger is visible.

Trains one backdoored model per variant (the attack table's recipe by default: digits, ResNet-18
x0.25, 20 epochs, batch 32, lr 0.05, no augmentation, 10 % poisoning, seed 0) and records, besides
clean accuracy and ASR: clean accuracy per class (a clean-label attack's cost lands on its target
class), the share of poisoned test images the trigger actually changes (a one-pixel trigger on a
pixel that is already white changes nothing), the ASR on the changed ones, and the same share
among the poisoned training images.

    python benchmarks/attack_diagnostics.py --out benchmarks/results/digits_attack_diagnostics_cpu.json
    python benchmarks/attack_diagnostics.py --variant sig:delta=40 --variant one-pixel
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rnp_fast.attacks import build_trigger, training_plan  # noqa: E402
from rnp_fast.bench import provenance, save_result  # noqa: E402
from rnp_fast.checkpoint import load_model_weights  # noqa: E402
from rnp_fast.config import AttackConfig, DataConfig, ModelConfig  # noqa: E402
from rnp_fast.errors import run_script  # noqa: E402
from rnp_fast.evaluate import build_test_sets, predict  # noqa: E402
from rnp_fast.loaders.sources import load_source  # noqa: E402
from rnp_fast.models import build_model  # noqa: E402
from rnp_fast.train import TrainConfig, train_backdoor  # noqa: E402

DEFAULT_VARIANTS = (
    "one-pixel",
    "sig",
    "sig:delta=40",
    "sig:delta=60",
    "lc",
    "lc:eps=16",
    "lc:eps=32",
)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``sig:delta=40,frequency=6`` -> ("sig", ["delta=40", "frequency=6"])."""
    attack, _, params = text.partition(":")
    return attack, [p for p in params.split(",") if p]


def diagnose(attack: str, params: list[str], source, args) -> dict:
    model_cfg = ModelConfig(arch="resnet18", width=args.width)
    data = DataConfig(dataset="digits", batch_size=32, augment=False, seed=args.seed)
    attack_cfg = AttackConfig(attack=attack, attack_param=params, poison_seed=args.seed)
    out = Path(tempfile.mkdtemp()) / "run"
    try:
        train = TrainConfig(epochs=args.epochs, lr=0.05)
        summary = train_backdoor(str(out), model_cfg, data, attack_cfg, train, "cpu", True)
        model = load_model_weights(build_model("resnet18", 10, args.width), out / "model.safetensors", "resnet18")
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    trigger = build_trigger(attack, image_size=32, channels=3, **attack_cfg.trigger_params())
    label_mode, target = attack_cfg.label_mode, attack_cfg.target
    tests = build_test_sets(source.test, trigger, label_mode, target, 10, source.mean, source.std, "cpu")
    labels = tests.clean.labels
    clean_pred = predict(model, tests.clean.images, tests.mean, tests.std, 256).argmax(1)
    hit = predict(model, tests.poisoned.images, tests.mean, tests.std, 256).argmax(1) == tests.poison_targets
    changed = (tests.poisoned.images != tests.clean.images[tests.reference_mask]).flatten(1).any(1)
    plan = training_plan(
        trigger, source.train.labels, attack_cfg.poison_rate, label_mode, target, 10, attack_cfg.poison_seed
    )
    poisoned = torch.nonzero(plan.poisoned).flatten()
    stamped = trigger.apply(source.train.images[poisoned], poisoned)
    changed_in_training = (stamped != source.train.images[poisoned]).flatten(1).any(1)
    return {
        "attack": attack,
        "attack_param": params,
        "clean_acc": summary["clean_acc"],
        "asr": summary["asr"],
        "clean_acc_per_class": [(clean_pred[labels == c] == c).float().mean().item() for c in range(10)],
        "share_changed_by_trigger": changed.float().mean().item(),
        "asr_where_changed": hit[changed].float().mean().item() if changed.any() else None,
        "poisoned_training_images": summary["poisoned_images"],
        "share_of_them_changed_by_trigger": changed_in_training.float().mean().item(),
        **({"label_consistent": summary["label_consistent"]} if "label_consistent" in summary else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", help="ATTACK[:KEY=VALUE,...] (repeatable; default: a set)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file for the results")
    args = parser.parse_args()
    source = load_source("digits")
    results = []
    for text in args.variant or DEFAULT_VARIANTS:
        entry = diagnose(*parse_variant(text), source, args)
        per_class = " ".join(f"{a:.2f}" for a in entry["clean_acc_per_class"])
        print(
            f"{text:14s} clean {entry['clean_acc']:.3f} ASR {entry['asr']:.3f} "
            f"changed {entry['share_changed_by_trigger']:.2f} per class [{per_class}]",
            flush=True,
        )
        results.append(entry)
    if args.out:
        setup = {"dataset": "digits", "arch": "resnet18", "width": args.width, "epochs": args.epochs, "seed": args.seed}
        print(
            f"saved {save_result({**provenance(torch.device('cpu')), 'setup': setup, 'variants': results}, args.out)}"
        )


if __name__ == "__main__":
    run_script(main, Path(__file__).name)
