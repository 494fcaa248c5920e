"""Why an attack does or does not implant: per-class clean accuracy and where the trigger is visible.

Trains one backdoored model per variant with the attack table's recipe (read from its sweep file,
digits_attacks.yaml: digits, ResNet-18 x0.25, 20 epochs, batch 32, lr 0.05, no augmentation, 10 %
poisoning; seed 0 here) and records, besides
clean accuracy and ASR: clean accuracy per class (a clean-label attack's cost lands on its target
class), the share of poisoned test images the trigger actually changes (a one-pixel trigger on a
pixel that is already white changes nothing), the ASR on the changed ones, and the same share
among the poisoned training images.

    python benchmarks/attack_diagnostics.py --out benchmarks/results/digits_attack_diagnostics_cpu.json
    python benchmarks/attack_diagnostics.py --variant sig:delta=40 --variant one-pixel
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from rnp_fast import harness
from rnp_fast import train as training
from rnp_fast.evaluation.predict import predict
from rnp_fast.resolved import resolve_run
from rnp_fast.sweep.spec import load_sweep

TABLE_SWEEP = Path(__file__).with_name("digits_attacks.yaml")  # the recipe's one home
PREDICT_BATCH = 256
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


def variant_job(text: str, args):
    """The attack table's job (its first: every job shares the training recipe) for this variant."""
    job = load_sweep(TABLE_SWEEP).jobs[0]
    attack, params = parse_variant(text)
    return replace(
        job,
        model=replace(job.model, width=job.model.width if args.width is None else args.width),
        data=replace(job.data, seed=args.seed),
        # label_mode None: the attack's own (clean-label for sig and lc), as in the sweep
        attack=replace(job.attack, attack=attack, label_mode=None, attack_param=params, poison_seed=args.seed),
        train=replace(job.train, epochs=job.train.epochs if args.epochs is None else args.epochs),
        engine=replace(job.engine, device=args.device, quiet=True),
    )


def train_model(job, run) -> tuple[dict, torch.nn.Module]:
    """Train the job's backdoored model in a scratch directory: its summary and the model."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        summary = training.train_backdoor(str(out), job.model, job.data, job.attack, job.train, job.engine, True)
        return summary, run.load_model(str(out / "model.safetensors"))


def test_set_facts(run, model: torch.nn.Module) -> dict:
    """Clean accuracy per class, and where the trigger changes a poisoned test image at all."""
    tests = run.tests
    labels = tests.clean.labels
    clean_pred = predict(model, tests.clean.images, tests.mean, tests.std, PREDICT_BATCH).argmax(1)
    hit = predict(model, tests.poisoned.images, tests.mean, tests.std, PREDICT_BATCH).argmax(1) == tests.poison_targets
    changed = (tests.poisoned.images != tests.clean.images[tests.reference_mask]).flatten(1).any(1)
    return {
        "clean_acc_per_class": [(clean_pred[labels == c] == c).float().mean().item() for c in range(run.num_classes)],
        "share_changed_by_trigger": changed.float().mean().item(),
        "asr_where_changed": hit[changed].float().mean().item() if changed.any() else None,
    }


def share_of_training_images_changed(run) -> float:
    """Of the training images the attack poisons, the share its trigger actually changes."""
    poisoned = torch.nonzero(training.poisoning_plan(run, run.attack).poisoned).flatten()
    originals = run.source.train.images[poisoned]
    return (run.trigger.apply(originals, poisoned) != originals).flatten(1).any(1).float().mean().item()


def diagnose(job, run) -> dict:
    summary, model = train_model(job, run)
    facts = test_set_facts(run, model)
    return {
        "attack": job.attack.attack,
        "attack_param": job.attack.attack_param,
        "clean_acc": summary["clean_acc"],
        "asr": summary["asr"],
        **facts,
        "poisoned_training_images": summary["poisoned_images"],
        "share_of_them_changed_by_trigger": share_of_training_images_changed(run),
        **({"label_consistent": summary["label_consistent"]} if "label_consistent" in summary else {}),
    }


def one_line(text: str, entry: dict) -> str:
    per_class = " ".join(f"{a:.2f}" for a in entry["clean_acc_per_class"])
    return (
        f"{text:14s} clean {entry['clean_acc']:.3f} ASR {entry['asr']:.3f} "
        f"changed {entry['share_changed_by_trigger']:.2f} per class [{per_class}]"
    )


def main() -> None:
    parser = harness.parser(__doc__, device="cpu")
    parser.add_argument("--variant", action="append", help="ATTACK[:KEY=VALUE,...] (repeatable; default: a set)")
    parser.add_argument("--epochs", type=harness.positive, help="training epochs (default: the table's, 20)")
    parser.add_argument("--width", type=float, help="model width (default: the table's, 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    variants = args.variant or DEFAULT_VARIANTS
    jobs = [variant_job(text, args) for text in variants]  # every variant checked before any training
    results = []
    for text, job in zip(variants, jobs, strict=True):
        run = resolve_run(job.model, job.data, job.attack, job.engine)
        results.append(diagnose(job, run))
        print(one_line(text, results[-1]), flush=True)
    setup = {"dataset": job.data.dataset, "arch": job.model.arch, "width": job.model.width}
    setup.update(epochs=job.train.epochs, seed=args.seed)
    harness.write_result({"setup": setup, "variants": results}, args.out, run.device)


if __name__ == "__main__":
    harness.run(main)
