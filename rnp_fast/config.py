"""Every configuration dataclass of rnp-fast, one per concern, validated on construction.

The CLI is derived from these classes (one flag per field, help text from ``doc``), sweep files
set their fields by ``SECTION.FIELD``, and every run writes the resolved configuration next to its
results. Defaults are the reference's. Field metadata carries the two rules other modules need:

- ``identity=False``: the field says where or how visibly a job runs, not what it computes
  (device, progress output); it is left out of a sweep job's hash, cannot be set in a sweep file
  (the backend sets it) and is not a setting of the results table;
- ``seed=True``: a seed; the results table averages over it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from rnp_fast.errors import UserError


def doc(text: str, identity: bool = True, seed: bool = False, aliases: tuple[str, ...] = (), **kwargs):
    """A dataclass field whose help text the CLI shows (see the module docstring for the flags);
    ``aliases``: older names of its flag that still work."""
    metadata = {"help": text, "identity": identity, "seed": seed, "aliases": aliases}
    return field(metadata=metadata, **kwargs)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


MAX_SEED = 2**63 - 1  # every seed reaches torch.manual_seed and NumPy's generators, which take 0..2**63-1


def require_seed(value: int, name: str) -> None:
    require(0 <= value <= MAX_SEED, f"--{name} must be in 0..{MAX_SEED}, got {value}")


# Sane bounds on counts, checked before anything is built from them: a typo (an extra zero, a
# seed pasted into --epochs) is refused in a second instead of running for years or building a
# list of a billion entries. Each bound is far above any run in the paper or its benchmarks.
MAX_EPOCHS = 10_000  # per stage (the reference: 20 unlearning, 20 recovering; training: 40-300)
MAX_BATCH = 1 << 20  # images per batch
MAX_PRUNING_STEPS = 10_000  # candidates of the pruning schedule (the reference: 19)
MAX_REPEATS = 10_000  # defenses of --repeats
MAX_SWEEP_JOBS = 1_000_000  # --max-jobs' own ceiling
MAX_PARALLEL = 1024  # worker processes per device, retries, ...


def require_count(value: int, name: str, low: int, high: int) -> None:
    """``value`` must be an integer in ``low..high`` (``name``: the flag, without dashes)."""
    require(
        isinstance(value, int) and low <= value <= high,
        f"--{name} must be in {low:,}..{high:,}, got {value:,}"
        if isinstance(value, int)
        else f"--{name} must be an integer",
    )


def pruning_steps(pruning_max: float, pruning_step: float) -> float:
    """How many candidates a schedule of ``pruning_max`` by ``pruning_step`` has (before building it)."""
    return pruning_max / pruning_step + 1


@dataclass
class DataConfig:
    dataset: str = doc(
        "digits (embedded), cifar10, cifar100, gtsrb, tiny-imagenet or imagefolder (train/<class>/, test/<class>/)",
        default="cifar10",
    )
    data_dir: str | None = doc("the dataset's directory (e.g. holding cifar-10-batches-py)", default=None)
    image_size: int | None = doc(
        "pixels per side the directory datasets are resized to (default: 32; tiny-imagenet 64)", default=None
    )
    download: bool = doc("download CIFAR-10 through torchvision when it is missing", default=False)
    ratio: float = doc("fraction of the training set used as defense data", default=0.01)
    holdout: float = doc("fraction of the defense data held out (not trained on) to choose the threshold", default=0.1)
    batch_size: int = doc("batch size of both learning stages", default=128)
    eval_batch_size: int = doc(
        "images per evaluation forward, at most (default: 512; the CPU evaluates 64 at a time, the log's "
        "'evaluation batch')",
        default=512,
    )
    augment: bool = doc("random crop (4 px padding) and flip on the defense data", default=True)
    shuffle: bool = doc("shuffle the defense data every epoch", default=True)
    seed: int = doc("seed for the defense subset, order and augmentation", default=0, seed=True)

    def __post_init__(self):
        require(0 < self.ratio <= 1, f"--ratio must be in (0, 1], got {self.ratio}")
        require(0 <= self.holdout < 1, f"--holdout must be in [0, 1), got {self.holdout}")
        require_count(self.batch_size, "batch-size", 1, MAX_BATCH)
        require_count(self.eval_batch_size, "eval-batch-size", 1, MAX_BATCH)
        require_seed(self.seed, "seed")
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
    poison_seed: int = doc("seed choosing the poisoned training images", default=0, seed=True)
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
        require_seed(self.poison_seed, "poison-seed")
        require_seed(self.trigger_seed, "trigger-seed")
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
    allow_small_holdout: bool = doc(
        "let the threshold rule choose on fewer held-out images than 1 / --tolerance (one image then "
        "decides the threshold); refused without it",
        default=False,
    )

    def __post_init__(self):
        self.schedule = tuple(int(m) for m in self.schedule)
        require(min(self.schedule, default=0) >= 0, f"--schedule milestones must be >= 0, got {list(self.schedule)}")
        for name in ("unlearning_lr", "recovering_lr"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"--{flag(name)} must be > 0, got {value}")
        require_count(self.unlearning_epochs, "unlearning-epochs", 0, MAX_EPOCHS)
        require_count(self.recovering_epochs, "recovering-epochs", 1, MAX_EPOCHS)
        require(max(self.schedule, default=0) <= MAX_EPOCHS, f"--schedule milestones must be <= {MAX_EPOCHS:,}")
        require(0 <= self.clean_threshold <= 1, "--clean-threshold must be in [0, 1]")
        require(0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.grad_clip >= 0, f"--grad-clip must be >= 0, got {self.grad_clip}")
        require(self.alpha > 0, f"--alpha must be > 0, got {self.alpha}")
        require(self.pruning_by in ("threshold", "number"), "--pruning-by must be threshold or number")
        require(self.pruning_step > 0, f"--pruning-step must be > 0, got {self.pruning_step}")
        require(
            math.isfinite(self.pruning_max) and pruning_steps(self.pruning_max, self.pruning_step) <= MAX_PRUNING_STEPS,
            f"--pruning-max {self.pruning_max} by --pruning-step {self.pruning_step} makes more than "
            f"{MAX_PRUNING_STEPS:,} pruning candidates; take a larger step",
        )
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
    device: str = doc("cpu, cuda, cuda:N or auto", default="auto", identity=False)
    mode: str = doc("fast (device-resident data) or reference (the reference's execution)", default="fast")
    eval_every: int = doc("evaluate both test sets every N epochs of both stages; 0 = off", default=0)
    scoring: str = doc(
        "how pruning candidates are scored: batched (all candidates per pass over the test data) or sequential",
        default="batched",
    )
    scoring_chunk: int = doc("candidates per batched scoring pass; 0 = as many as free memory allows", default=0)
    compile: bool | None = doc(
        "torch.compile the learning steps and the candidate scoring (default: on with CUDA where the process "
        "reuses them: sweeps, bench, repeated defenses; off for a single defense and on CPU)",
        default=None,
    )
    amp: str = doc(
        "autocast precision: bf16, fp16, off or auto (bf16 on CUDA; off on CPU, except the per-epoch "
        "report on CPUs with AMX bf16)",
        default="auto",
    )
    channels_last: bool | None = doc(
        "channels_last activations (default: on with CUDA; CPU: evaluation only)", default=None
    )
    cuda_graphs: bool | None = doc(
        "CUDA graphs: the eager learning steps captured and replayed, or reduce-overhead with --compile "
        "(default: on with CUDA when not compiling)",
        default=None,
    )
    bn_kernel: str = doc("masked BatchNorm: triton, torch or auto (triton where measured faster)", default="auto")
    deterministic: bool = doc("bit-identical reruns on CUDA too (deterministic kernels; slower)", default=False)
    quiet: bool = doc("no progress bars or per-epoch lines on the terminal", default=False, identity=False)

    def __post_init__(self):
        require(self.mode in ("fast", "reference"), f"--mode must be fast or reference, got {self.mode!r}")
        require_count(self.eval_every, "eval-every", 0, MAX_EPOCHS)
        require(
            self.scoring in ("batched", "sequential"),
            f"--scoring must be batched or sequential, got {self.scoring!r}",
        )
        require_count(self.scoring_chunk, "scoring-chunk", 0, MAX_PRUNING_STEPS)
        require(self.amp in ("bf16", "fp16", "off", "auto"), f"--amp must be bf16, fp16, off or auto, got {self.amp!r}")
        require(
            self.bn_kernel in ("triton", "torch", "auto"),
            f"--bn-kernel must be triton, torch or auto, got {self.bn_kernel!r}",
        )


SLACK = 1e-9  # a drop computed as a difference of two float32 accuracies may overshoot its decimal


@dataclass(frozen=True)
class Goal:
    """What the verdict (`verdict.judge`) counts as a successful defense: ASR after at most
    ``max_asr`` at a drop of full-test clean accuracy of at most ``max_clean_drop`` (--success-asr,
    --success-clean-drop; the defaults: ASR <= 0.1 at a drop <= 2 points)."""

    max_asr: float = 0.1
    max_clean_drop: float = 0.02

    def __post_init__(self):
        number = (int, float)
        asr, loss = self.max_asr, self.max_clean_drop
        require(isinstance(asr, number) and 0 <= asr <= 1, f"--success-asr must be a number in [0, 1], got {asr}")
        finite = isinstance(loss, number) and math.isfinite(loss) and loss >= 0
        require(finite, f"--success-clean-drop must be a finite number >= 0, got {loss}")

    def asr_met(self, asr: float) -> bool:
        return asr <= self.max_asr

    def drop_met(self, clean_drop: float) -> bool:
        return clean_drop <= self.max_clean_drop + SLACK

    def met(self, before_clean: float, after_clean: float, after_asr: float) -> bool:
        """Both criteria on bare figures (a point of the schedule's curve)."""
        return self.asr_met(after_asr) and self.drop_met(before_clean - after_clean)

    def as_dict(self) -> dict:
        return {"max_asr": self.max_asr, "max_clean_drop": self.max_clean_drop}


# The engine fields that training reads too (the rest are the defense's: mode, evaluation, scoring,
# BatchNorm kernel). The ones besides device and quiet change the trained model's numerics.
TRAIN_ENGINE_FIELDS = ("device", "compile", "amp", "channels_last", "cuda_graphs", "deterministic", "quiet")


@dataclass
class ModelConfig:
    arch: str = doc(
        "architecture (resnet18, preactresnet18, vgg19_bn, mobilenetv2, ...) or a model factory "
        "package.module:function (importable; its BatchNorm2d layers are masked)",
        default="resnet18",
    )
    width: float = doc("channel-width multiplier (1 = the standard model)", default=1.0)
    arch_kwargs: list[str] = doc(
        "keyword arguments of an --arch package.module:function factory (e.g. torchvision.models:resnet18) "
        "as KEY=VALUE, repeatable or comma-separated; values are read as int, float, true/false or text",
        default_factory=list,
    )

    def __post_init__(self):
        from rnp_fast.models.imported import check_factory_path, is_factory_path, parse_arch_kwargs

        require(self.width > 0, f"--width must be > 0, got {self.width}")
        self.arch_kwargs = list(self.arch_kwargs or [])
        if is_factory_path(self.arch):  # the factory's own arguments size it, not --width
            check_factory_path(self.arch)
            require(self.width == 1.0, "--width is for the zoo; give a factory's size through --arch-kwargs")
            parse_arch_kwargs(self.arch_kwargs)
        else:
            require(not self.arch_kwargs, "--arch-kwargs is for an --arch package.module:function factory")


@dataclass
class TrainConfig:
    """`train-backdoor`'s own settings (the model, data, attack and engine sections are shared)."""

    epochs: int = doc("training epochs", default=40)
    lr: float = doc("peak SGD learning rate", default=0.1)
    momentum: float = doc("SGD momentum", default=0.9)
    weight_decay: float = doc("SGD weight decay", default=5e-4)
    lr_schedule: str = doc("onecycle, cosine or multistep (x0.1 at 1/2 and 3/4 of training)", default="onecycle")
    train_beton: str | None = doc(
        "read the training split through FFCV from this .beton (rnp-fast convert DATASET OUT.beton)", default=None
    )

    def __post_init__(self):
        require_count(self.epochs, "epochs", 1, MAX_EPOCHS)
        require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        require(
            self.lr_schedule in ("onecycle", "cosine", "multistep"),
            f"--lr-schedule must be onecycle, cosine or multistep, got {self.lr_schedule!r}",
        )


BENCH_WORKLOADS = ("demo", "cifar")
BENCH_MODES = ("reference", "fast")


@dataclass
class BenchConfig:
    """`rnp-fast bench`: the reference mode and the fast mode on identical work."""

    workload: str = doc("demo (the bundled digits model) or cifar (ResNet-18, CIFAR-shaped synthetic)", default="demo")
    device: str = doc("cpu, cuda, cuda:N or auto", default="auto")
    repeats: int = doc("timed runs per mode after the cold run; medians over these", default=3)
    unlearning_epochs: int = doc("unlearning epochs, run in full (early stop off); default: the workload's", default=0)
    recovering_epochs: int = doc("recovering epochs; default: the workload's", default=0)
    eval_every: int = doc("evaluate both test sets every N epochs (1 as the reference; 0 = off)", default=1)
    modes: str = doc("modes to run, comma separated", default="reference,fast")
    fresh_compile_cache: bool = doc(
        "start from an empty Inductor cache, so the cold run pays full compilation", default=False
    )

    def __post_init__(self):
        workloads = ", ".join(BENCH_WORKLOADS)
        require(self.workload in BENCH_WORKLOADS, f"--workload must be one of {workloads}, got {self.workload!r}")
        require_count(self.repeats, "repeats", 1, MAX_REPEATS)
        require_count(self.unlearning_epochs, "unlearning-epochs", 0, MAX_EPOCHS)
        require_count(self.recovering_epochs, "recovering-epochs", 0, MAX_EPOCHS)
        require_count(self.eval_every, "eval-every", 0, MAX_EPOCHS)
        unknown = set(self.mode_list) - set(BENCH_MODES)
        require(not unknown and self.mode_list, f"--modes takes reference and/or fast, got {self.modes!r}")

    @property
    def mode_list(self) -> list[str]:
        return [mode.strip() for mode in self.modes.split(",") if mode.strip()]


SWEEP_BACKENDS = ("local", "ray")


@dataclass
class SweepRunConfig:
    """How `rnp-fast sweep` runs a sweep file's jobs (not what they compute)."""

    store: str = doc("results directory: results.sqlite, models/, jobs/, sweep.log", default="")
    backend: str = doc("where jobs run: local or ray", default="local")
    address: str | None = doc("Ray cluster address (default: RAY_ADDRESS, else a new local Ray)", default=None)
    gpus: int | None = doc("GPUs to use, one worker each (default: all visible; 0 = CPU)", default=None)
    jobs_per_device: int | None = doc(
        "jobs at once on each GPU (default 1), or on the CPU without one (default: one per core available "
        "to this process, fewer if memory is short); each job uses one torch thread",
        default=None,
        aliases=("--jobs-per-gpu",),
    )
    retry_failed: bool = doc("run failed jobs again", default=False)
    max_retries: int = doc("Ray's retries of a task whose worker died", default=3)
    max_jobs: int = doc("refuse sweeps with more jobs (counted from the axes before expanding them)", default=10_000)
    quiet: bool = doc("no progress bar or job lines on the terminal", default=False)

    def __post_init__(self):
        require(self.backend in SWEEP_BACKENDS, f"--backend must be local or ray, got {self.backend!r}")
        require(not (self.address and self.backend != "ray"), "--address is for --backend ray")
        require(
            not (self.gpus is not None and self.backend == "ray"),
            "--gpus is for --backend local (Ray tasks use the cluster's GPUs)",
        )
        if self.gpus is not None:
            require_count(self.gpus, "gpus", 0, MAX_PARALLEL)
        if self.jobs_per_device is not None:
            require_count(self.jobs_per_device, "jobs-per-device", 1, MAX_PARALLEL)
        require_count(self.max_retries, "max-retries", 0, MAX_PARALLEL)
        require_count(self.max_jobs, "max-jobs", 1, MAX_SWEEP_JOBS)


# The sections of a sweep job, as sweep files name them.
SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "attack": AttackConfig,
    "train": TrainConfig,
    "rnp": RNPConfig,
    "engine": EngineConfig,
}


def not_identity(section: str) -> tuple[str, ...]:
    """Fields of a section that say where a job runs, not what it computes (``identity=False``)."""
    return tuple(f.name for f in fields(SECTIONS[section]) if not f.metadata.get("identity", True))


def seed_paths() -> tuple[str, ...]:
    """``SECTION.FIELD`` of every seed (``seed=True``)."""
    return tuple(f"{name}.{f.name}" for name, cls in SECTIONS.items() for f in fields(cls) if f.metadata.get("seed"))


def flag(name: str) -> str:
    return name.replace("_", "-")


def to_dict(*configs) -> dict:
    """{class name: fields} for the resolved-config file."""
    return {type(c).__name__: asdict(c) for c in configs}


def field_names(cls) -> list[str]:
    return [f.name for f in fields(cls)]
