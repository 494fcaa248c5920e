"""Run configuration: one dataclass per concern, validated on construction.

The CLI is derived from these classes (one flag per field, help text from ``doc``), and every run
writes the resolved configuration next to its results. Defaults are the reference's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from rnp_fast.errors import UserError


def doc(text: str, **kwargs):
    """A dataclass field whose help text the CLI shows."""
    return field(metadata={"help": text}, **kwargs)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


@dataclass
class DataConfig:
    dataset: str = doc(
        "digits (embedded), cifar10, cifar100, gtsrb, tiny-imagenet or imagefolder (train/<class>/, test/<class>/)",
        default="cifar10",
    )
    data_dir: str | None = doc("the dataset's directory (e.g. holding cifar-10-batches-py)", default=None)
    image_size: int | None = doc(
        "pixels per side the directory datasets are resized to (32; tiny-imagenet 64)", default=None
    )
    download: bool = doc("download CIFAR-10 through torchvision when it is missing", default=False)
    ratio: float = doc("fraction of the training set used as defense data", default=0.01)
    holdout: float = doc("fraction of the defense data held out (not trained on) to choose the threshold", default=0.1)
    batch_size: int = doc("batch size of both learning stages", default=128)
    eval_batch_size: int = doc("batch size for evaluation", default=512)
    augment: bool = doc("random crop (4 px padding) and flip on the defense data", default=True)
    shuffle: bool = doc("shuffle the defense data every epoch", default=True)
    seed: int = doc("seed for the defense subset, order and augmentation", default=0)

    def __post_init__(self):
        require(0 < self.ratio <= 1, f"--ratio must be in (0, 1], got {self.ratio}")
        require(0 <= self.holdout < 1, f"--holdout must be in [0, 1), got {self.holdout}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.eval_batch_size >= 1, f"--eval-batch-size must be >= 1, got {self.eval_batch_size}")
        if self.image_size is not None:  # the triggers' corner patches need room
            require(8 <= self.image_size <= 1024, f"--image-size must be in 8..1024, got {self.image_size}")


@dataclass
class AttackConfig:
    attack: str = doc("trigger used to build the poisoned test set", default="badnets")
    label_mode: str | None = doc(
        "all2one, all2all or clean-label; default: the attack's own (clean-label for sig and lc)", default=None
    )
    target: int = doc("target label of the backdoor", default=0)
    poison_rate: float = doc("fraction of training images poisoned (train-backdoor)", default=0.1)
    poison_seed: int = doc("seed choosing the poisoned training images", default=0)
    poison: bool = doc(
        "poison the training set (train-backdoor); --no-poison trains the same model on clean data, "
        "the baseline an attack's clean accuracy is compared with (its ASR: the trigger on a clean model)",
        default=True,
    )
    trigger_seed: int = doc("seed of the trigger's random parts (blend noise, wanet warp, trojan patch)", default=0)
    attack_param: list[str] = doc(
        "the attack's own parameter as KEY=VALUE, e.g. alpha=0.1 or pattern=trigger.png (repeatable)",
        default_factory=list,
    )

    def __post_init__(self):
        from rnp_fast.attacks import DEFAULT_LABEL_MODE, check_attack, parse_attack_params

        require(0 < self.poison_rate <= 1, f"--poison-rate must be in (0, 1], got {self.poison_rate}")
        require(self.target >= 0, f"--target must be >= 0, got {self.target}")
        self.attack_param = list(self.attack_param or [])
        check_attack(self.attack, parse_attack_params(self.attack_param))
        if self.label_mode is None:
            self.label_mode = DEFAULT_LABEL_MODE[self.attack]
        require(
            self.label_mode in ("all2one", "all2all", "clean-label"),
            f"--label-mode must be all2one, all2all or clean-label, got {self.label_mode!r}",
        )

    def trigger_params(self) -> dict:
        """Keyword arguments for ``build_trigger``: the trigger seed and the parsed --attack-param values."""
        from rnp_fast.attacks import parse_attack_params

        return {"seed": self.trigger_seed, **parse_attack_params(self.attack_param)}

    def files(self) -> list[str]:
        """The attack's parameter values that name files (trigger images, .npz patches): inputs
        that an output directory must never contain."""
        from rnp_fast.attacks import parse_attack_params

        return [v for v in parse_attack_params(self.attack_param).values() if isinstance(v, str) and "." in v]


@dataclass
class RNPConfig:
    unlearning_lr: float = doc("unlearning learning rate (SGD)", default=0.01)
    unlearning_epochs: int = doc("last unlearning epoch index: epochs 0..N run, N+1 at most", default=20)
    schedule: tuple[int, ...] = doc("unlearning MultiStepLR milestones (epochs)", default=(10, 20))
    clean_threshold: float = doc("stop unlearning once train accuracy <= this", default=0.20)
    early_stop: bool = doc(
        "stop unlearning at --clean-threshold (off: run every epoch, as benchmarks do)", default=True
    )
    momentum: float = doc("SGD momentum of both stages", default=0.9)
    weight_decay: float = doc("unlearning weight decay", default=5e-4)
    grad_clip: float = doc("gradient-norm clip in unlearning; 0 = off (the reference's is a no-op)", default=0.0)
    recovering_lr: float = doc("mask learning rate in recovering (SGD)", default=0.2)
    recovering_epochs: int = doc("recovering epochs", default=20)
    alpha: float = doc("recovering loss weight: loss = alpha * CE", default=0.2)
    pruning_by: str = doc("threshold or number", default="threshold")
    pruning_max: float = doc("largest threshold (or channel count with --pruning-by number)", default=0.90)
    pruning_step: float = doc("threshold step (or channel-count step)", default=0.05)
    threshold: float | None = doc("fixed pruning threshold; default: chosen from clean data", default=None)
    tolerance: float = doc("clean-accuracy drop allowed by the threshold rule (held-out data)", default=0.02)

    def __post_init__(self):
        self.schedule = tuple(int(m) for m in self.schedule)
        for name in ("unlearning_lr", "recovering_lr"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"--{flag(name)} must be > 0, got {value}")
        require(self.unlearning_epochs >= 0, f"--unlearning-epochs must be >= 0, got {self.unlearning_epochs}")
        require(self.recovering_epochs >= 1, f"--recovering-epochs must be >= 1, got {self.recovering_epochs}")
        require(0 <= self.clean_threshold <= 1, "--clean-threshold must be in [0, 1]")
        require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        require(self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        require(self.pruning_by in ("threshold", "number"), "--pruning-by must be threshold or number")
        require(self.pruning_step > 0, f"--pruning-step must be > 0, got {self.pruning_step}")
        if self.pruning_by == "threshold":
            require(0 <= self.pruning_max <= 1, f"--pruning-max must be in [0, 1], got {self.pruning_max}")
        else:
            require(
                self.pruning_step == int(self.pruning_step) and self.pruning_max == int(self.pruning_max),
                "--pruning-step and --pruning-max must be whole channel counts with --pruning-by number",
            )
        if self.threshold is not None:
            require(0 <= self.threshold <= 1, f"--threshold must be in [0, 1], got {self.threshold}")
        require(0 <= self.tolerance <= 1, f"--tolerance must be in [0, 1], got {self.tolerance}")


@dataclass
class EngineConfig:
    device: str = doc("cpu, cuda, cuda:N or auto", default="auto")
    mode: str = doc("fast (device-resident data) or reference (the reference's execution)", default="fast")
    eval_every: int = doc("evaluate both test sets every N epochs of both stages; 0 = off", default=0)
    sweep_mode: str = doc("pruning evaluation: batched (all candidates per pass) or sequential", default="batched")
    sweep_chunk: int = doc("candidates per batched pass; 0 = as many as free memory allows", default=0)
    compile: bool | None = doc("torch.compile the learning steps (default: on with CUDA, off on CPU)", default=None)
    amp: str = doc("autocast precision: bf16, fp16, off or auto (bf16 on CUDA, off on CPU)", default="auto")
    channels_last: bool | None = doc("channels_last activations (default: on with CUDA)", default=None)
    cuda_graphs: bool | None = doc("CUDA graphs for the compiled steps (torch.compile reduce-overhead)", default=None)
    bn_kernel: str = doc("masked BatchNorm: triton, torch or auto (triton where measured faster)", default="auto")
    deterministic: bool = doc("bit-identical reruns on CUDA too (deterministic kernels; slower)", default=False)
    quiet: bool = doc("no progress bars or per-epoch lines on the terminal", default=False)

    def __post_init__(self):
        require(self.mode in ("fast", "reference"), f"--mode must be fast or reference, got {self.mode!r}")
        require(self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}")
        require(
            self.sweep_mode in ("batched", "sequential"),
            f"--sweep-mode must be batched or sequential, got {self.sweep_mode!r}",
        )
        require(self.sweep_chunk >= 0, f"--sweep-chunk must be >= 0, got {self.sweep_chunk}")
        require(self.amp in ("bf16", "fp16", "off", "auto"), f"--amp must be bf16, fp16, off or auto, got {self.amp!r}")
        require(
            self.bn_kernel in ("triton", "torch", "auto"),
            f"--bn-kernel must be triton, torch or auto, got {self.bn_kernel!r}",
        )


@dataclass
class ModelConfig:
    arch: str = doc("architecture (resnet18, preactresnet18, vgg19_bn, mobilenetv2, ...)", default="resnet18")
    width: float = doc("channel-width multiplier (1 = the standard model)", default=1.0)

    def __post_init__(self):
        require(self.width > 0, f"--width must be > 0, got {self.width}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def to_dict(*configs) -> dict:
    """{class name: fields} for the resolved-config file."""
    return {type(c).__name__: asdict(c) for c in configs}


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]
