"""Engine settings: how the learning steps run (compilation, precision, layout, BatchNorm kernel).

The flags (`EngineConfig`) may say "auto"; `resolve_engine` turns them into concrete settings for a
device: fast on CUDA (torch.compile, bf16 autocast, channels_last, the BatchNorm kernel where the
measured table says it wins), safe on CPU (eager fp32 training in the reference's layout, so its
masks match the reference mode's; evaluation, which feeds nothing back, in channels_last and
small batches). The reference mode always runs eager fp32 NCHW
with the reference's batch sizes, as the reference does.

Static shapes: the steps are compiled with ``dynamic=False``. A defense set whose size is not a
multiple of the batch size has one partial last batch, so each step compiles at most twice (full
and last batch), once per process, never once per epoch; the partial batch is never padded, since
padding would enter BatchNorm's batch statistics and change the math.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rnp_fast.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


@dataclass(frozen=True)
class EngineSettings:
    compile: bool = False
    amp: torch.dtype | None = None
    channels_last: bool = False
    cuda_graphs: bool = False
    bn_kernel: str = "torch"  # torch, triton or auto (per layer shape, from the measured table)
    eval_rows: int | None = None  # images per evaluation forward; None: --eval-batch-size
    eval_channels_last: bool = False  # layout of evaluation inputs

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp) if self.amp else nullcontext()

    def describe(self) -> str:
        amp = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "off"}[self.amp]
        rows = self.eval_rows or "--eval-batch-size"
        return (
            f"evaluation batch {rows}, compile {'on' if self.compile else 'off'}, amp {amp}, "
            f"channels_last {'on' if self.channels_last else 'off'}, "
            f"cuda graphs {'on' if self.cuda_graphs else 'off'}, BatchNorm kernel {self.bn_kernel}"
        )


EAGER = EngineSettings()
CPU_EVAL_ROWS = 64


def resolve_engine(config, device: torch.device) -> EngineSettings:
    """Concrete settings for ``device`` from an `EngineConfig` (None / "auto" = the device's default)."""
    if config.mode == "reference":
        return EAGER
    cuda = device.type == "cuda"
    settings = EngineSettings(
        compile=cuda if config.compile is None else config.compile,
        amp=AMP_DTYPES["bf16" if cuda else "off"] if config.amp == "auto" else AMP_DTYPES[config.amp],
        # Training layout: NHWC is ~1.2x faster on the CPU too, but it changes the order of float
        # operations, and a short unlearning run amplifies that (mask values moved by up to 0.9 on
        # the tiny test model), so the CPU keeps the reference's layout and its results
        channels_last=cuda if config.channels_last is None else config.channels_last,
        # Evaluation does not feed back into training: NHWC there (4x faster on the CPU,
        # benchmarks/results/layout_demo_cpu.json)
        eval_channels_last=True if config.channels_last is None else config.channels_last,
        cuda_graphs=bool(config.cuda_graphs),
        bn_kernel=("auto" if cuda else "torch") if config.bn_kernel == "auto" else config.bn_kernel,
        # CPU: per-image cost is lowest at small batches, which stay in cache (channels_last, demo
        # model: 64 images 0.19 ms/image, 512 images 0.55 ms/image); the GPU wants the large batch
        eval_rows=None if cuda else CPU_EVAL_ROWS,
    )
    check_settings(settings, device)
    if config.deterministic:
        make_deterministic()
    return settings


def make_deterministic() -> None:
    """Deterministic kernels everywhere (CPU runs are already bit-identical for a seed).

    cuDNN's autotuner and non-deterministic algorithms are turned off, cuBLAS gets a fixed
    workspace, and PyTorch raises on an operation that has no deterministic version. The Triton
    masked BatchNorm reduces without atomics, so it is deterministic as it is.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


def check_settings(settings: EngineSettings, device: torch.device) -> None:
    if settings.cuda_graphs and not (device.type == "cuda" and settings.compile):
        raise UserError("--cuda-graphs needs a CUDA device and --compile")
    if settings.amp is torch.float16 and device.type != "cuda":
        raise UserError("--amp fp16 needs a CUDA device; use --amp bf16 or off on the CPU")
    if settings.bn_kernel == "triton":
        from rnp_fast.kernels import triton_available

        if device.type != "cuda":
            raise UserError("--bn-kernel triton needs a CUDA device (the kernels run on the GPU)")
        if not triton_available():
            raise UserError("--bn-kernel triton needs Triton: pip install 'rnp-fast[triton]'")


def prepare_model(model: nn.Module, settings: EngineSettings) -> nn.Module:
    """Layout and BatchNorm kernel choice, in place (the weights are unchanged)."""
    from rnp_fast.masked_bn import set_bn_kernel

    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    set_bn_kernel(model, settings.bn_kernel)
    return model


def compiled(model: nn.Module, settings: EngineSettings):
    """The callable the steps use: the model itself, or its torch.compile'd version.

    Compiled code is reused: within a process, Dynamo caches per forward code and guards (modules
    are inlined, so a new model of the same architecture reuses it: a sweep compiles once); across
    processes, Inductor's FX-graph and AOTAutograd caches live in the user's cache directory.
    """
    if not settings.compile:
        return model
    use_persistent_cache()
    mode = "reduce-overhead" if settings.cuda_graphs else None  # reduce-overhead = CUDA graphs
    return torch.compile(model, dynamic=False, mode=mode)


def use_persistent_cache() -> None:
    """Inductor's on-disk caches under ~/.cache/rnp-fast (or $XDG_CACHE_HOME), unless the user set one."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rnp-fast" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(base))


def to_layout(images: torch.Tensor, settings: EngineSettings) -> torch.Tensor:
    return images.contiguous(memory_format=torch.channels_last) if settings.channels_last else images


def sgd(parameters, device: torch.device, **options) -> torch.optim.SGD:
    """SGD with one fused kernel for the whole update on CUDA (no per-parameter launches)."""
    if device.type == "cuda":
        return torch.optim.SGD(parameters, fused=True, **options)
    return torch.optim.SGD(parameters, **options)
