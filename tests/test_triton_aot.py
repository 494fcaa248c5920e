"""The Triton kernels compile for the H200 (sm_90) on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which never lowers them: a typing error, a
layout the backend rejects or a tile needing more shared memory than the device has would first
show on the GPU. Here the launchers of kernels/masked_bn.py run as on CUDA (the H200's launch
plan: 132 SMs) but each launch only compiles, through Triton's own JIT path (the same argument
specialisation, constexprs and warps as a real launch), for GPUTarget("cuda", 90, 32): Triton IR,
TTGIR, LLVM IR, PTX and, with the ptxas shipped in Triton's wheel, a cubin.

The compiling runs in a child process: the other tests set TRITON_INTERPRET before Triton is
imported, which turns every kernel into an interpreted function.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

H200 = {"arch": 90, "warp_size": 32, "sms": 132, "shared_bytes": 227 * 1024}  # per block, opt-in maximum
KERNELS = {
    "_fwd_partials_kernel",
    "_fwd_finalize_kernel",
    "_fwd_apply_kernel",
    "_bwd_partials_kernel",
    "_bwd_finalize_kernel",
    "_bwd_dx_kernel",
}
# (N, C, H, W): CIFAR ResNet-18's first and last BatchNorm shapes at batch 128, and a tiny one with
# C = 12 (ragged channel blocks, small tiles with 4 warps)
SHAPES = [(128, 64, 32, 32), (128, 512, 4, 4), (3, 12, 7, 5)]


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    pytest.importorskip("triton")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache:
        env["TRITON_CACHE_DIR"] = cache  # a cold compile of every variant, nothing reused
        result = subprocess.run(
            [sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900, check=False
        )
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = json.loads(result.stdout.splitlines()[-1])
    assert set(compiled) == KERNELS
    for name, variants in compiled.items():
        assert variants, name
        for variant in variants:
            assert variant["arch"] == f"sm{H200['arch']}", (name, variant)
            assert "ptx" in variant["stages"] and ".target sm_90" in variant["ptx_target"], (name, variant)
            assert variant["shared"] <= H200["shared_bytes"], (name, variant)
    # the forward and the dx kernels in both precisions the engine runs (fp32, and bf16 under AMP)
    for name in ("_fwd_apply_kernel", "_bwd_dx_kernel"):
        x_types = {variant["x_type"] for variant in compiled[name]}
        assert {"float32", "bfloat16", "float16"} <= x_types, (name, x_types)
    print({name: (len(v), sorted(v[0]["stages"])) for name, v in compiled.items()})


# ---------------------------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------------------------


class CompileOnlyDriver:
    """What Triton's JIT asks the active driver before compiling: the device, its stream, its target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def compile_every_launch() -> dict[str, list[dict]]:
    """Run the launchers on CPU tensors with every kernel launch turned into a compile for sm_90."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from rnp_fast.kernels import masked_bn

    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", H200["arch"], H200["warp_size"])))
    compiled: dict[str, dict[str, dict]] = {}
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)  # warmup: compile, do not launch
        compiled.setdefault(self.fn.__name__, {})[kernel.metadata.hash] = describe(kernel, first=args[0])
        return kernel

    JITFunction.run = compile_only
    masked_bn._sm_count = lambda index: H200["sms"]
    plan = masked_bn._plan
    masked_bn._plan = lambda m, c, channels_fastest, device: plan(m, c, channels_fastest, torch.device("cuda", 0))
    for shape in SHAPES:
        for x_dtype, param_dtype in ((torch.float32,) * 2, (torch.bfloat16, torch.float32), (torch.float16,) * 2):
            for layout in (torch.channels_last, torch.contiguous_format):
                x = torch.randn(shape).to(x_dtype).to(memory_format=layout)
                launch_both(masked_bn, x, torch.randn_like(x), param_dtype)
    x = torch.randn(SHAPES[0]).to(memory_format=torch.channels_last)
    launch_both(masked_bn, x, torch.randn(1, *x.shape[1:]).expand(x.shape), torch.float32)  # autograd's expand
    return {name: list(variants.values()) for name, variants in compiled.items()}


def launch_both(masked_bn, x, dy, param_dtype) -> None:
    import torch

    c = x.shape[1]
    weight, bias, mask, running_mean, running_var = (torch.ones(c, dtype=param_dtype) for _ in range(5))
    for training in (True, False):
        _, mean, rstd, _ = masked_bn.masked_bn_forward(x, weight, bias, mask, running_mean, running_var, training, 1e-5)
        masked_bn.masked_bn_backward(dy, x, mean, rstd, weight, mask, training)


def describe(kernel, first) -> dict:
    """What a compiled kernel is: its target, the stages Triton produced, its shared memory, the
    dtype of its first tensor (x or dy, for the [M, C] kernels)."""
    ptx = kernel.asm.get("ptx", "")
    target_line = next((line for line in ptx.splitlines() if line.startswith(".target")), "")
    return {
        "arch": kernel.metadata.arch if isinstance(kernel.metadata.arch, str) else f"sm{kernel.metadata.arch}",
        "stages": sorted(kernel.asm),
        "ptx_target": target_line,
        "shared": kernel.metadata.shared,
        "num_warps": kernel.metadata.num_warps,
        "x_type": str(first.dtype).replace("torch.", ""),
    }


if __name__ == "__main__":
    print(json.dumps(compile_every_launch()))
