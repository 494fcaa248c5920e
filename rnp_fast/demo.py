"""`rnp-fast demo`: defend the bundled BadNets ResNet-18 (width 0.25) on the digits set.

The bundled checkpoint was made by the project's own trainer (see the README, "Demo"):

    rnp-fast train-backdoor --out demo-model --dataset digits --width 0.25 --epochs 30 \\
        --batch-size 32 --lr 0.05 --no-augment --device cpu

(BadNets grid trigger, all2one, target 0, 10% poisoning, seeds 0; clean accuracy 0.988, ASR 1.0).
The digits set is small (1,198 training images), so the demo uses 30% of it as defense data and
the hyperparameters below; everything else is the reference's default.
"""

from __future__ import annotations

from importlib import resources

from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig

CHECKPOINT = "demo_badnets_digits_resnet18w025.safetensors"

DEMO_MODEL = ModelConfig(arch="resnet18", width=0.25)
DEMO_DATA = dict(dataset="digits", ratio=0.3, batch_size=128)
DEMO_RNP = dict(unlearning_lr=0.005)


def demo_checkpoint() -> str:
    return str(resources.files("rnp_fast") / "assets" / CHECKPOINT)


def demo_job(out: str, device: str = "auto", mode: str = "fast", quiet: bool = False):
    from rnp_fast.defend import DefendJob

    return DefendJob(
        model_path=demo_checkpoint(),
        out=out,
        model=DEMO_MODEL,
        data=DataConfig(**DEMO_DATA),
        attack=AttackConfig(attack="badnets", label_mode="all2one", target=0),
        rnp=RNPConfig(**DEMO_RNP),
        engine=EngineConfig(device=device, mode=mode, quiet=quiet),
    )


def run_demo(out: str, device: str = "auto", mode: str = "fast", quiet: bool = False) -> dict:
    from rnp_fast.defend import run_defense

    return run_defense(demo_job(out, device, mode, quiet))
