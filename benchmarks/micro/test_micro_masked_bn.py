"""Masked BatchNorm in training mode, forward and forward + backward: one group per pass, whose rows
are PyTorch eager (the reference), compiled PyTorch, the fused operator (PyTorch on the CPU, the
Triton kernels on CUDA) and, on the CPU, the Triton kernels themselves in Triton's interpreter.

The shapes: a ResNet-18 layer's at batch 128 in bf16 channels_last on CUDA (the recover step's
setting); a tiny fp32 one on the CPU, where the interpreter runs every Triton program in Python.
Every variant's output (and gradients of x and the mask) is checked against the reference.
``extra_info`` records the activations' minimal DRAM traffic, the same for every variant (the
forward reads x and writes y: 2 tensors; forward + backward also reads dy and x and writes dx: 5),
from which a reader gets GB/s.

The setting is the recover stage's: training mode (batch statistics, running statistics updated),
fp32 parameters and statistics, gradients for x and the mask only.
"""

import functools

import pytest
import torch

from rnp_fast.engine import raise_recompile_limit
from rnp_fast.kernels import masked_batch_norm_reference, triton_available

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPE = (128, 64, 32, 32) if CUDA else (8, 16, 8, 8)
DTYPE, TOLERANCE = (torch.bfloat16, 2e-2) if CUDA else (torch.float32, 1e-4)
PASSES = {"fwd": "masked-bn forward", "fwd+bwd": "masked-bn forward+backward"}
TENSORS_MOVED = {"fwd": 2, "fwd+bwd": 5}  # activation-sized reads + writes (see above)
MOMENTUM, EPS = 0.1, 1e-5
compiled_is_slow_on_cpu = pytest.mark.slow if not CUDA else []


def make_inputs(shape, dtype: torch.dtype, channels_last: bool, device: torch.device) -> dict[str, torch.Tensor]:
    """x and dy in ``dtype``; fp32 gamma and beta (frozen), mask in [0, 1] and running statistics."""
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(shape, generator=g, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    c, vec = shape[1], {"generator": g, "device": device}
    return {
        "x": x.requires_grad_(True),
        "weight": torch.randn(c, **vec),
        "bias": torch.randn(c, **vec),
        "mask": torch.rand(c, **vec).requires_grad_(True),
        "running_mean": torch.zeros(c, device=device),
        "running_var": torch.ones(c, device=device),
        "dy": torch.randn_like(x).detach(),
    }


@functools.cache
def provider_fn(provider: str):
    """The masked BatchNorm of ``provider`` (one compiled reference per process: each shape compiles once)."""
    if provider == "eager":
        return masked_batch_norm_reference
    if provider == "compiled":
        raise_recompile_limit()  # a static-shape version per shape, dtype and pass
        return torch.compile(masked_batch_norm_reference, fullgraph=True, dynamic=False)
    from rnp_fast.kernels.ops import masked_batch_norm

    return masked_batch_norm


def pass_fn(provider: str, pass_: str, inputs: dict[str, torch.Tensor]):
    """The timed work: the forward, or the forward and the gradients of x and the mask."""
    fn = provider_fn(provider)
    names = ("x", "weight", "bias", "mask", "running_mean", "running_var")

    def forward():
        return fn(*(inputs[name] for name in names), True, MOMENTUM, EPS)

    if pass_ == "fwd":
        return forward
    return lambda: torch.autograd.grad(forward(), (inputs["x"], inputs["mask"]), inputs["dy"])


def expected(inputs: dict, pass_: str) -> list[torch.Tensor]:
    """The reference's output, or its gradients of x and the mask, on copies of ``inputs``."""
    copies = {name: t.detach().clone().requires_grad_(t.requires_grad) for name, t in inputs.items()}
    return list(pass_fn("eager", pass_, copies)()) if pass_ == "fwd+bwd" else [pass_fn("eager", pass_, copies)()]


def triton_pass(pass_: str, t: dict):
    """The Triton launchers themselves (rnp_fast.kernels.masked_bn), as the operator calls them on CUDA."""
    from rnp_fast.kernels import masked_bn

    def forward():
        stats = (t["running_mean"], t["running_var"])
        return masked_bn.masked_bn_forward(
            t["x"].detach(), t["weight"], t["bias"], t["mask"].detach(), *stats, True, EPS
        )

    if pass_ == "fwd":
        return lambda: [forward()[0]]

    def forward_backward():
        y, mean, rstd, _ = forward()
        dx, _, _, dmask = masked_bn.masked_bn_backward(
            t["dy"], t["x"].detach(), mean, rstd, t["weight"], t["mask"], True
        )
        return [dx, dmask]

    return forward_backward


VARIANTS = [
    pytest.param("eager", id="pytorch-eager"),
    pytest.param("compiled", id="pytorch-compiled", marks=compiled_is_slow_on_cpu),
    pytest.param("fused", id="operator"),
    pytest.param("triton", id="triton-kernels", marks=pytest.mark.skipif(CUDA, reason="on CUDA: the operator")),
]


@pytest.mark.parametrize("pass_", list(PASSES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_masked_batch_norm(benchmark, synced, variant, pass_):
    if variant == "triton" and not triton_available():
        pytest.skip("Triton is not installed")
    benchmark.group = PASSES[pass_]
    inputs = make_inputs(SHAPE, DTYPE, CUDA, DEVICE)
    benchmark.extra_info["activation_bytes_moved"] = (
        TENSORS_MOVED[pass_] * inputs["x"].numel() * inputs["x"].element_size()
    )
    want = expected(inputs, pass_)
    if variant == "triton":
        run = triton_pass(pass_, inputs)
    else:
        fn = pass_fn(variant, pass_, inputs)
        run = (lambda: list(fn())) if pass_ == "fwd+bwd" else (lambda: [fn()])
    got = benchmark(synced(run))
    for value, reference in zip(got, want, strict=True):
        assert torch.allclose(value.float(), reference.float(), atol=TOLERANCE, rtol=TOLERANCE)


def test_the_reference_is_what_the_masked_layer_computes():
    """The eager row times the product's PyTorch path: F.batch_norm with weight * mask."""
    from rnp_fast.masked_batchnorm import MaskedBatchNorm2d

    layer = MaskedBatchNorm2d(SHAPE[1]).to(DEVICE)
    inputs = make_inputs(SHAPE, torch.float32, False, DEVICE)
    layer.weight.data, layer.bias.data, layer.neuron_mask.data = inputs["weight"], inputs["bias"], inputs["mask"]
    args = (inputs["weight"], inputs["bias"], inputs["mask"], None, None, True, 0.1, EPS)
    assert torch.allclose(layer(inputs["x"]), masked_batch_norm_reference(inputs["x"], *args), atol=1e-6)
