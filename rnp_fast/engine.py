"""Engine settings: how the learning steps and the evaluation run (compilation, CUDA graphs,
precision, layout, BatchNorm kernel, cuDNN autotuning).

The flags (`EngineConfig`) may say "auto"; `resolve_engine` turns them into concrete settings for a
device, with the reason for each choice that is not obvious:

- CUDA: bf16 autocast, channels_last, cuDNN autotuning, the fused masked-BatchNorm operator where
  the measured table says the whole recover step is faster, and either torch.compile'd steps
  (where the process reuses them: a sweep, a benchmark, repeated defenses from Python) or, for a
  single defense where compilation would not pay back, eager steps replayed as CUDA graphs;
- CPU: eager fp32 training in the reference's layout, so its masks match the reference mode's;
  evaluation (which feeds nothing back into training) in channels_last with small batches;
- the reference mode: always eager fp32 NCHW with the reference's batch sizes.

`apply_engine` then makes the per-model choices once, at set-up (layout, and the BatchNorm kernel
of every masked layer): nothing inside a forward looks anything up.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rnp_fast.device import cpuinfo
from rnp_fast.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class EngineSettings:
    compile: bool = False
    amp: torch.dtype | None = None
    channels_last: bool = False
    cuda_graphs: bool = False
    bn_kernel: str = "torch"  # torch, triton (the fused operator) or auto (the measured table decides)
    eval_rows: int | None = None  # images per evaluation forward; None: --eval-batch-size
    eval_channels_last: bool = False  # layout of evaluation inputs
    # Precision of the per-epoch report (informational: nothing is chosen from it); the scoring
    # that picks the threshold and the before/after metrics always use ``amp``
    epoch_eval_amp: torch.dtype | None = None
    deterministic: bool = False
    compile_backend: object = "inductor"  # tests count graphs with a backend of their own
    reasons: tuple[str, ...] = field(default=(), compare=False)  # why compile / CUDA graphs are on or off

    def describe(self) -> str:
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp]
        rows = self.eval_rows or "--eval-batch-size"
        report = "" if self.epoch_eval_amp is self.amp else " (per-epoch report bf16: AMX)"
        return (
            f"evaluation batch {rows}, compile {'on' if self.compile else 'off'}, amp {amp}{report}, "
            f"channels_last {'on' if self.channels_last else 'off'}, "
            f"cuda graphs {'on' if self.cuda_graphs else 'off'}, BatchNorm kernel {self.bn_kernel}"
        )


EAGER = EngineSettings()
CPU_EVAL_ROWS = 64


def resolve_engine(config, device: torch.device, reuse: bool = False) -> EngineSettings:
    """Concrete settings for ``device`` from an `EngineConfig` (None / "auto" = the device's default).

    ``reuse``: this process will run the same steps again (a sweep, a benchmark, repeated
    defenses), which is where compilation pays back its cold start."""
    if config.mode == "reference":  # the reference's way: eager fp32 NCHW (deterministic if asked)
        settings = EngineSettings(deterministic=config.deterministic)
        configure_backends(settings, device)
        return settings
    cuda = device.type == "cuda"
    compile_on, compile_reason = choose_compile(config.compile, cuda, reuse)
    graphs_on = cuda and not compile_on if config.cuda_graphs is None else bool(config.cuda_graphs)
    amp = AMP_DTYPES["bf16" if cuda else "off"] if config.amp == "auto" else AMP_DTYPES[config.amp]
    settings = EngineSettings(
        compile=compile_on,
        amp=amp,
        # Training layout: NHWC is ~1.2x faster on the CPU too, but it changes the order of float
        # operations, and a short unlearning run amplifies that (mask values moved by up to 0.9 on
        # the tiny test model), so the CPU keeps the reference's layout and its results
        channels_last=cuda if config.channels_last is None else config.channels_last,
        # Evaluation does not feed back into training: NHWC there (4x faster on the CPU,
        # benchmarks/results/layout_demo_cpu.json)
        eval_channels_last=True if config.channels_last is None else config.channels_last,
        cuda_graphs=graphs_on,
        bn_kernel=("auto" if cuda else "torch") if config.bn_kernel == "auto" else config.bn_kernel,
        # CPU: per-image cost is lowest at small batches, which stay in cache (channels_last, demo
        # model: 64 images 0.19 ms/image, 512 images 0.55 ms/image); the GPU wants the large batch
        eval_rows=None if cuda else CPU_EVAL_ROWS,
        epoch_eval_amp=epoch_report_precision(config.amp, amp, cuda),
        deterministic=config.deterministic,
        reasons=(compile_reason, graphs_reason(graphs_on, compile_on, config.cuda_graphs, cuda)),
    )
    check_settings(settings, device)
    configure_backends(settings, device)
    return settings


def epoch_report_precision(flag: str, amp: torch.dtype | None, cuda: bool) -> torch.dtype | None:
    """The engine's precision, except on a CPU with AMX bf16 units under ``--amp auto``: there the
    per-epoch report runs in bf16, 2.25x faster than fp32 on the demo defense's test sets
    (predictions equal on all 1,139 images, logits moved by up to 0.12:
    benchmarks/results/eval_precision_demo_cpu.json), while training, the scoring and the
    before/after metrics stay fp32, so masks and pruning tables still equal the reference mode's."""
    if cuda or flag != "auto" or not cpu_has_amx_bf16():
        return amp
    return torch.bfloat16


def cpu_has_amx_bf16() -> bool:
    return "amx_bf16" in (cpuinfo("flags") or "").split()


def choose_compile(flag: bool | None, cuda: bool, reuse: bool) -> tuple[bool, str]:
    if flag is not None:
        return flag, f"compile {'on' if flag else 'off'} (--{'' if flag else 'no-'}compile)"
    if not cuda:
        return False, "compile off: the CPU runs eager (--compile forces it)"
    if reuse:
        return True, "compile on: this process reuses the compiled steps (sweep, benchmark or repeated defenses)"
    return False, (
        "compile off: a single defense would spend more on compiling (tens of seconds cold) than it saves; "
        "--compile forces it, sweeps and benchmarks turn it on"
    )


def graphs_reason(on: bool, compile_on: bool, flag: bool | None, cuda: bool) -> str:
    if not cuda:
        return "cuda graphs off: no CUDA device"
    if flag is not None:
        return f"cuda graphs {'on' if on else 'off'} (--{'' if on else 'no-'}cuda-graphs)"
    if compile_on:
        return "cuda graphs off: the compiled steps run without them (--cuda-graphs: reduce-overhead mode)"
    return "cuda graphs on: the eager learning steps are captured once and replayed"


def check_settings(settings: EngineSettings, device: torch.device) -> None:
    if settings.cuda_graphs and device.type != "cuda":
        raise UserError("--cuda-graphs needs a CUDA device")
    if settings.amp is torch.float16:
        raise UserError(
            "--amp fp16 needs a CUDA device and a gradient scaler, and rnp-fast has none (recovering's mask "
            "gradients underflow in fp16, ascent can overflow): use --amp bf16 (as fast on current GPUs) or off"
        )
    if settings.bn_kernel == "triton" and device.type != "cuda":
        raise UserError("--bn-kernel triton needs a CUDA device (the kernels run on the GPU)")
    if settings.bn_kernel == "triton":
        from rnp_fast.kernels import triton_available

        if not triton_available():
            raise UserError("--bn-kernel triton needs Triton: pip install 'rnp-fast[triton]'")


def configure_backends(settings: EngineSettings, device: torch.device) -> None:
    """Process-wide switches: cuDNN autotuning in fast mode on CUDA, or deterministic kernels."""
    if settings.deterministic:
        make_deterministic()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotuned convolutions pay back at once


def make_deterministic() -> None:
    """Deterministic kernels everywhere (CPU runs are already bit-identical for a seed).

    cuDNN's autotuner and non-deterministic algorithms are turned off, cuBLAS gets a fixed
    workspace, and PyTorch raises on an operation that has no deterministic version. The models
    pool with avg_pool2d, whose CUDA backward is deterministic; the Triton masked BatchNorm
    reduces without atomics, so it is deterministic as it is.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def apply_engine(model: nn.Module, settings: EngineSettings, sample: torch.Tensor | None = None) -> nn.Module:
    """Layout and BatchNorm kernel choice, in place (the weights are unchanged). ``sample``: one
    input batch, which tells the `auto` kernel choice the shape of every masked layer."""
    from rnp_fast.masked_batchnorm import choose_bn_kernels

    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    choose_bn_kernels(model, settings.bn_kernel, sample, settings.amp)
    return model


def raise_recompile_limit(limit: int = 64) -> None:
    """Dynamo's per-function recompile limit (8) is shared by every model and batch size a sweep
    compiles the step (or a scoring stage) for; past it Dynamo silently falls back to eager. Raise it once."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def use_persistent_cache() -> None:
    """Inductor's on-disk caches under ~/.cache/rnp-fast (or $XDG_CACHE_HOME), unless the user set one."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnp-fast" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(base))


def to_layout(images: torch.Tensor, settings: EngineSettings) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if settings.channels_last else images


def autocast(device: torch.device, amp: torch.dtype | None, cache: bool = True):
    """Precision ``amp`` (None: float32) for code run on ``device``: every learning step and every
    evaluation enters its precision here. ``cache=False`` inside CUDA-graph captures (required there)."""
    if not amp:
        return nullcontext()
    return torch.autocast(device.type, dtype=amp, cache_enabled=cache)
