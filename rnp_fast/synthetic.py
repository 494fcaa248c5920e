"""The benchmark's CIFAR-shaped job: a randomly initialised ResNet-18 on synthetic CIFAR-10 data.

Speed does not depend on weights or pixels, so `rnp-fast bench --workload cifar` needs no dataset
and no trained model: it writes a seeded random ResNet-18 next to the run directory once.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rnp_fast.checkpoint import save_safetensors
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, RNPConfig
from rnp_fast.models import build_model


def synthetic_cifar_job(out: str, device: str = "auto"):
    from rnp_fast.defense import DefendJob

    checkpoint = Path(out).parent / "synthetic-resnet18.safetensors"
    if not checkpoint.exists():
        torch.manual_seed(0)
        save_safetensors(build_model("resnet18", 10).state_dict(), checkpoint, {"arch": "resnet18"})
    return DefendJob(
        model_path=str(checkpoint),
        out=out,
        model=ModelConfig(arch="resnet18"),
        data=DataConfig(dataset="synthetic-cifar10", ratio=0.01),
        attack=AttackConfig(attack="badnets", label_mode="all2one", target=0),
        rnp=RNPConfig(),
        engine=EngineConfig(device=device, quiet=True),
    )
