"""`rnp-fast demo`: defend the bundled BadNets ResNet-18 (width 0.25) on the digits set.

The bundled checkpoint was made by the project's own trainer (see the README, "Demo"):

    rnp-fast train-backdoor --out demo-model --dataset digits --width 0.25 --epochs 60 \\
        --batch-size 32 --lr 0.05 --device cpu

(BadNets grid trigger, all2one, target 0, 10% poisoning, seeds 0, random crop and flip; clean
accuracy 0.987, ASR 1.0).

The digits set is small (1,198 training images), so the demo defends with 30% of it (359 images),
holds 30% of those out for the threshold rule (108 images; with the reference's 10% one image is
worth more than the rule's 2% tolerance), and uses a batch of 32 with gentler learning rates: with
only 251 training images, the reference's batch of 128 gives two steps per epoch and unlearning
collapses the model within one epoch. Everything else is the reference's default.

A caveat the README repeats: on a model this small RNP is sensitive to which images form the
defense set. With seed 0 (the demo) the rule removes the backdoor (at 3.3 points of full-test
accuracy, nearly all of it the target digit); over seeds 0-9 it succeeds on none on full-test
accuracy and on 2 of 10 on non-target accuracy (docs/efficacy.md). `rnp-fast demo --repeats N`
measures it.
"""

from __future__ import annotations

from importlib import resources

from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, Goal, ModelConfig, RNPConfig

CHECKPOINT = "demo_badnets_digits_resnet18w025.safetensors"

DEMO_MODEL = ModelConfig(arch="resnet18", width=0.25)
DEMO_DATA = dict(dataset="digits", ratio=0.3, holdout=0.3, batch_size=32)
DEMO_RNP = dict(unlearning_lr=0.002, recovering_lr=0.05)


def demo_checkpoint() -> str:
    return str(resources.files("rnp_fast") / "assets" / CHECKPOINT)


def demo_job(out: str, engine: EngineConfig | None = None, goal: Goal | None = None):
    """The demo's defense, with the caller's engine settings (default: EngineConfig()) and the
    verdict's goal (default: Goal())."""
    from rnp_fast.defense import DefendJob

    return DefendJob(
        model_path=demo_checkpoint(),
        out=out,
        model=DEMO_MODEL,
        data=DataConfig(**DEMO_DATA),
        attack=AttackConfig(attack="badnets", label_mode="all2one", target=0),
        rnp=RNPConfig(**DEMO_RNP),
        engine=engine or EngineConfig(),
        goal=goal or Goal(),
    )


def run_demo(out: str, engine: EngineConfig | None = None, goal: Goal | None = None) -> dict:
    from rnp_fast.defense import run_defense

    return run_defense(demo_job(out, engine, goal))
