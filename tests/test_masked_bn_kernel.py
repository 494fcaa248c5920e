"""The fused masked BatchNorm operator (rnp_fast.kernels.ops) and its Triton kernels.

- The operator's PyTorch implementation (what the CPU runs) against the reference (F.batch_norm
  with weight * mask): outputs, running statistics and every gradient, gradcheck in float64,
  torch.library.opcheck, and a compiled training step (fullgraph, one graph) against eager.
- The Triton launchers (kernels/masked_bn.py) against the reference: through Triton's interpreter
  on CPU tensors without a GPU (tiny shapes), compiled for real on CUDA. Skipped without Triton.
- CUDA only: the operator on CUDA against the operator on the CPU at ResNet-18 shapes, and a step
  compiled with Inductor.

Expected values come from the reference evaluated on upcast (fp32, or fp64) copies of the
inputs, so the tolerances measure the implementation's own error.
"""

import copy
import os

import torch

# triton.jit reads TRITON_INTERPRET when the kernels are decorated, i.e. when
# rnp_fast.kernels.masked_bn is imported, so set it before that (and before importing triton).
# Only without a GPU: with one, the kernels must be compiled for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402
from triton_compat import make_interpreter_accept_new_numpy  # noqa: E402

from rnp_fast.kernels.ops import masked_batch_norm  # noqa: E402
from rnp_fast.kernels.reference import masked_batch_norm_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton launchers run
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (N, C, H, W), tiny (the interpreter runs every Triton program in Python):
SHAPES = [
    (2, 3, 4, 4),  # C smaller than any channel block (masked channel lanes)
    (4, 8, 5, 3),  # odd H and W, M = 60 not a multiple of the row block
]
TRITON_SHAPES = [*SHAPES, (3, 12, 7, 5)]  # + C = 12: a ragged last channel block in NCHW (blocks of 8)
# (x dtype, atol, rtol); parameters and running statistics stay fp32 (the AMP setting). The bf16
# tolerances are about one rounding of the output: an 8-bit significand, relative step
# 2^-8 = 3.9e-3, on outputs of size 1-5 and gradients summed over a few dozen rows.
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 1e-2),
]
DTYPE_IDS = ["fp32", "bf16"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
LAYOUT_IDS = ["nchw", "channels_last"]
MOMENTUM, EPS = 0.1, 1e-5
GRAD_NAMES = ("x", "weight", "bias", "mask")


def _inputs(shape, dtype, layout, param_dtype=torch.float32, seed=0):
    """x (mean 3, std 2, so the normalisation matters), weight, bias, mask in [0, 1], running
    statistics, and an upstream gradient dy."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * 2 + 3).to(dtype).to(memory_format=layout)
    vecs = {
        "weight": torch.randn(c, generator=g),
        "bias": torch.randn(c, generator=g),
        "mask": torch.rand(c, generator=g),
        "running_mean": torch.randn(c, generator=g),
        "running_var": torch.rand(c, generator=g) + 0.5,
    }
    dy = torch.randn(shape, generator=g).to(dtype)
    return x, {k: v.to(param_dtype) for k, v in vecs.items()}, dy


def _run(fn, x, vecs, dy, training, device="cpu", upcast=None, requires_grad=GRAD_NAMES):
    """Forward + backward through fn; every output, running statistic and gradient, on the CPU."""
    cast = (lambda t: t.to(upcast)) if upcast else (lambda t: t)
    leaves = {"x": x, **{k: vecs[k] for k in ("weight", "bias", "mask")}}
    leaves = {k: cast(v).to(device).detach().requires_grad_(k in requires_grad) for k, v in leaves.items()}
    rm, rv = (cast(vecs[k]).to(device).clone() for k in ("running_mean", "running_var"))
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["mask"], rm, rv, training, MOMENTUM, EPS)
    wanted = [k for k in GRAD_NAMES if k in requires_grad]
    grads = torch.autograd.grad(y, [leaves[k] for k in wanted], cast(dy).to(device))
    out = {"y": y, "running_mean": rm, "running_var": rv}
    out.update({f"d{k}": gr for k, gr in zip(wanted, grads, strict=True)})
    return {k: v.detach().cpu() for k, v in out.items()}


def _assert_matches(actual, expected, atol, rtol):
    assert actual.keys() == expected.keys()
    for key, exp in expected.items():
        torch.testing.assert_close(
            actual[key].to(exp.dtype), exp, atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}"
        )


# ---------------------------------------------------------------------------------------------
# The operator's PyTorch implementation (the CPU's)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=DTYPE_IDS)
def test_cpu_op_matches_reference(dtype, atol, rtol, shape, layout, training):
    x, vecs, dy = _inputs(shape, dtype, layout)
    got = _run(masked_batch_norm, x, vecs, dy, training)
    want = _run(masked_batch_norm_reference, x, vecs, dy, training, upcast=torch.float32)
    _assert_matches(got, want, atol, rtol)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert got["dmask"].dtype == torch.float32 and got["running_var"].dtype == torch.float32
    if layout == torch.channels_last:  # outputs keep the input's layout
        assert got["y"].is_contiguous(memory_format=torch.channels_last)
        assert got["dx"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_op_matches_batch_norm_in_float64(training):
    # F.batch_norm with weight * mask written out, in fp64: agreement to rounding, running stats too
    x, vecs, _ = _inputs((4, 8, 5, 3), torch.float64, torch.channels_last, param_dtype=torch.float64)
    rm, rv = vecs["running_mean"].clone(), vecs["running_var"].clone()
    y = masked_batch_norm(x, vecs["weight"], vecs["bias"], vecs["mask"], rm, rv, training, MOMENTUM, EPS)
    rm_ref, rv_ref = vecs["running_mean"].clone(), vecs["running_var"].clone()
    weight = vecs["weight"] * vecs["mask"]
    y_ref = F.batch_norm(x, rm_ref, rv_ref, weight, vecs["bias"], training, MOMENTUM, EPS)
    for got, want in ((y, y_ref), (rm, rm_ref), (rv, rv_ref)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert training != torch.equal(rm, vecs["running_mean"])  # updated in training only


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_gradcheck_float64(layout, training):
    x, vecs, _ = _inputs((2, 3, 3, 2), torch.float64, layout, param_dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (x, vecs["weight"], vecs["bias"], vecs["mask"])]
    stats = (vecs["running_mean"], vecs["running_var"]) if not training else (None, None)

    def fn(x, weight, bias, mask):
        return masked_batch_norm(x, weight, bias, mask, *stats, training, MOMENTUM, EPS)

    assert torch.autograd.gradcheck(fn, leaves)


def test_parameters_in_input_dtype():
    # a model cast wholesale to bf16: weight, bias, mask and running stats in bf16 too
    x, vecs, dy = _inputs((3, 16, 8, 8), torch.bfloat16, torch.channels_last, param_dtype=torch.bfloat16)
    got = _run(masked_batch_norm, x, vecs, dy, True)
    want = _run(masked_batch_norm_reference, x, vecs, dy, True, upcast=torch.float32)
    _assert_matches(got, want, atol=2e-2, rtol=1e-2)
    assert got["dmask"].dtype == torch.bfloat16 and got["running_var"].dtype == torch.bfloat16


def test_frozen_parameters_and_no_running_stats():
    # RNP's recover stage: only the mask (and x upstream) need gradients; BN without tracking
    x, vecs, dy = _inputs((4, 8, 5, 3), torch.float32, torch.channels_last)
    got = _run(masked_batch_norm, x, vecs, dy, True, requires_grad=("x", "mask"))
    want = _run(masked_batch_norm_reference, x, vecs, dy, True, requires_grad=("x", "mask"))
    _assert_matches(got, want, atol=1e-5, rtol=1e-5)
    params = (x, vecs["weight"], vecs["bias"], vecs["mask"])
    y_none = masked_batch_norm(*params, None, None, True, MOMENTUM, EPS)
    y_ref = masked_batch_norm_reference(*params, None, None, True, MOMENTUM, EPS)
    torch.testing.assert_close(y_none, y_ref, atol=1e-5, rtol=1e-5)


def test_statistics_are_not_differentiable():
    x, vecs, _ = _inputs((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    x.requires_grad_(True)
    y, mean, rstd, var = torch.ops.rnp_fast.masked_bn(
        x, vecs["weight"], vecs["bias"], vecs["mask"], None, None, True, EPS
    )
    assert y.requires_grad and not any(t.requires_grad for t in (mean, rstd, var))


def _opcheck_cases():
    """(op, args): both operators, train and eval, both layouts, with and without running stats."""
    cases = []
    for layout in LAYOUTS:
        x, v, dy = _inputs((2, 3, 4, 4), torch.float32, layout)
        params = [t.clone().requires_grad_(True) for t in (x, v["weight"], v["bias"], v["mask"])]
        for training, stats in ((True, (None, None)), (False, (v["running_mean"], v["running_var"]))):
            cases.append((torch.ops.rnp_fast.masked_bn.default, (*params, *stats, training, EPS)))
            _, mean, rstd, _ = torch.ops.rnp_fast.masked_bn(x, v["weight"], v["bias"], v["mask"], *stats, training, EPS)
            args = (dy, x, mean, rstd, v["weight"], v["mask"], training)
            cases.append((torch.ops.rnp_fast.masked_bn_backward.default, args))
    return cases


def test_opcheck():
    # schema, fake kernels against the real ones (shapes, dtypes, strides), autograd registration,
    # and AOT dispatch with dynamic shapes
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    for op, args in _opcheck_cases():
        result = torch.library.opcheck(op, args)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def test_variance_accurate_with_large_mean():
    # mean 1e3, std 2: the running variance keeps fp32 accuracy (unbiased, as F.batch_norm's)
    x, vecs, dy = _inputs((4, 8, 5, 3), torch.float32, torch.contiguous_format)
    x = x - 3 + 1000
    got = _run(masked_batch_norm, x, vecs, dy, True)
    torch.testing.assert_close(got["running_var"].double(), _expected_running_var(x, vecs), atol=1e-6, rtol=1e-5)


def _expected_running_var(x, vecs):
    x64 = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return (1 - MOMENTUM) * vecs["running_var"].double() + MOMENTUM * x64.var(dim=1, unbiased=True)


# ---------------------------------------------------------------------------------------------
# Compiled training step (CPU): one graph, same results as eager
# ---------------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """conv -> masked BN (the fused operator) -> ReLU -> pooled linear head."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))
        self.mask = nn.Parameter(torch.rand(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = masked_batch_norm(
            h, self.weight, self.bias, self.mask, self.running_mean, self.running_var, self.training, MOMENTUM, EPS
        )
        return self.head(F.relu(h).mean((2, 3)))


def _train_steps(model, step, batches):
    """Runs step (forward + loss) then backward on each batch; losses and grads of the last batch."""
    losses = []
    for images, labels in batches:
        model.zero_grad(set_to_none=True)
        loss = step(images, labels)
        loss.backward()
        losses.append(loss.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return losses, grads


def _batches(device, layout, count=2):
    g = torch.Generator().manual_seed(1)
    shape = (4, 3, 6, 5)
    return [
        (
            torch.randn(shape, generator=g).to(device).to(memory_format=layout),
            torch.randint(0, 4, (shape[0],), generator=g).to(device),
        )
        for _ in range(count)
    ]


def _eager_and_compiled(device, layout, backend):
    """(eager results, compiled results, compile counter) of two training steps of TinyNet."""
    torch.manual_seed(0)
    eager_model = TinyNet().to(device).to(memory_format=layout).train()
    compiled_model = copy.deepcopy(eager_model)
    batches = _batches(device, layout)

    def forward_loss(model):
        return lambda images, labels: F.cross_entropy(model(images), labels)

    counter = CompileCounterWithBackend(backend)
    compiled_step = torch.compile(forward_loss(compiled_model), fullgraph=True, dynamic=False, backend=counter)
    eager = (*_train_steps(eager_model, forward_loss(eager_model), batches), eager_model)
    compiled = (*_train_steps(compiled_model, compiled_step, batches), compiled_model)
    return eager, compiled, counter


def _assert_same_training(eager, compiled, atol, rtol):
    (eager_losses, eager_grads, eager_model), (losses, grads, model) = eager, compiled
    torch.testing.assert_close(losses, eager_losses, atol=atol, rtol=rtol)
    torch.testing.assert_close(grads, eager_grads, atol=atol, rtol=rtol)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model, name), getattr(eager_model, name), atol=atol, rtol=rtol)
    assert not torch.equal(model.running_var, torch.ones_like(model.running_var))  # it did update


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_compiled_training_step_one_graph(layout):
    # aot_eager: Dynamo + AOTAutograd (the backward graph comes from the registered autograd
    # formula) without Inductor's C++ compile, so the step runs the same kernels as eager
    eager, compiled, counter = _eager_and_compiled("cpu", layout, "aot_eager")
    assert counter.frame_count == 1  # one graph for both steps: no graph break, no recompile
    assert "rnp_fast.masked_bn" in counter.graphs[0].code  # the operator is one node in it
    _assert_same_training(eager, compiled, atol=0.0, rtol=0.0)


# ---------------------------------------------------------------------------------------------
# The Triton launchers (interpreter on CPU tensors without a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def kernels():
    """kernels/masked_bn.py; skips when Triton is missing (the rest of this file needs no Triton)."""
    pytest.importorskip("triton")
    from rnp_fast.kernels import masked_bn

    if not torch.cuda.is_available():  # the interpreter: Triton 3.6 with numpy >= 2.4 (see triton_compat)
        make_interpreter_accept_new_numpy()
    return masked_bn


def _launch(kernels, x, vecs, dy, training):
    """Forward and backward launchers on DEVICE: y, the statistics and the four gradients."""
    t = {k: v.to(DEVICE) for k, v in vecs.items()}
    x, dy = x.to(DEVICE), dy.to(DEVICE)
    stats = (t["running_mean"], t["running_var"]) if not training else (None, None)
    y, mean, rstd, var = kernels.masked_bn_forward(x, t["weight"], t["bias"], t["mask"], *stats, training, EPS)
    dx, dweight, dbias, dmask = kernels.masked_bn_backward(dy, x, mean, rstd, t["weight"], t["mask"], training)
    out = {"y": y, "mean": mean, "rstd": rstd, "var": var, "dx": dx, "dweight": dweight, "dbias": dbias}
    out["dmask"] = dmask
    return {k: v.cpu() for k, v in out.items()}


def _expected(x, vecs, dy, training):
    """The reference in fp64: y, the statistics the kernels return, and the four gradients."""
    got = _run(masked_batch_norm_reference, x, vecs, dy, training, upcast=torch.float64)
    if training:
        mean, var = x.double().mean((0, 2, 3)), x.double().var((0, 2, 3), correction=0)
        var_unbiased = x.double().var((0, 2, 3), correction=1)
    else:
        mean, var = vecs["running_mean"].double(), vecs["running_var"].double()
        var_unbiased = var
    got.update(mean=mean, rstd=(var + EPS).rsqrt(), var=var_unbiased)
    del got["running_mean"], got["running_var"]
    return got


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_launchers_match_reference(kernels, shape, layout, training):
    x, vecs, dy = _inputs(shape, torch.float32, layout)
    got = _launch(kernels, x, vecs, dy, training)
    _assert_matches(got, _expected(x, vecs, dy, training), atol=1e-5, rtol=1e-5)
    assert got["y"].stride() == got["dx"].stride() == torch.empty_like(x).stride()  # x's layout


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_launchers_bf16(kernels, training):
    x, vecs, dy = _inputs((4, 8, 5, 3), torch.bfloat16, torch.channels_last)
    got = _launch(kernels, x, vecs, dy, training)
    _assert_matches(got, _expected(x, vecs, dy, training), atol=2e-2, rtol=1e-2)
    assert got["y"].dtype == got["dx"].dtype == torch.bfloat16 and got["mean"].dtype == torch.float32


@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_triton_multi_split_reduction(kernels, monkeypatch, layout):
    # Shrink the tiles so both reduction stages loop: several row splits each summing several
    # tiles (the last ones partly or fully past M), ragged channel blocks, several stage-2 steps.
    monkeypatch.setattr(kernels, "_TILE_ELEMS", 64)
    monkeypatch.setattr(kernels, "_FINAL_TILE_ELEMS", 8)
    monkeypatch.setattr(kernels, "_FINAL_BLOCK_C", 4)
    monkeypatch.setattr(kernels, "_max_splits", lambda device, c_blocks: 4)
    shape = (3, 12, 7, 5)  # M = 105 rows
    plan = kernels._plan(3 * 7 * 5, 12, channels_fastest=layout == torch.channels_last, device=torch.device(DEVICE))
    assert plan.splits > 1 and plan.tiles_per_split > 1 and plan.final_block_p < plan.splits
    assert plan.c_blocks * plan.block_c > 12  # masked channel lanes in the last block
    x, vecs, dy = _inputs(shape, torch.float32, layout)
    for training in (True, False):
        got = _launch(kernels, x, vecs, dy, training)
        _assert_matches(got, _expected(x, vecs, dy, training), atol=1e-5, rtol=1e-5)


# (N, C, H, W): CIFAR ResNet-18's BatchNorm shapes at batch 128 (and 512 for the largest)
RESNET18_SHAPES = [(128, 64, 32, 32), (512, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4)]


@pytest.mark.parametrize("channels_last", [True, False], ids=LAYOUT_IDS[::-1])
@pytest.mark.parametrize("shape", RESNET18_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_plan_sizes_stage_two_to_the_device(kernels, monkeypatch, shape, channels_last):
    # On an H200 (132 SMs): stage 1 fills a few waves, and stage 2 reads each channel's P partial
    # rows in a few vectorised steps instead of looping over ~1,000 of them
    monkeypatch.setattr(kernels, "_sm_count", lambda index: 132)
    n, c, h, w = shape
    plan = kernels._plan(n * h * w, c, channels_last, torch.device("cuda", 0))
    target = kernels._WAVES * 132 // plan.c_blocks  # row splits per channel block
    assert plan.splits <= target and 2 * plan.splits >= min(plan.row_tiles, target)
    assert -(-plan.splits // plan.final_block_p) <= 3
    assert plan.tiles_per_split * plan.splits >= plan.row_tiles  # every tile is summed


def test_triton_bitwise_deterministic(kernels):
    # two-stage reductions in a fixed order: the same inputs give the same bits every time
    x, vecs, dy = _inputs((3, 16, 8, 8), torch.float32, torch.channels_last)
    first, second = (_launch(kernels, x, vecs, dy, True) for _ in range(2))
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_triton_variance_accurate_with_large_mean(kernels):
    # mean 1e3, std 2: sum(x^2) - M*mean^2 would cancel ~6 of fp32's 7 digits; the shifted sums do not
    x, vecs, dy = _inputs((4, 8, 5, 3), torch.float32, torch.contiguous_format)
    x = x - 3 + 1000
    got = _launch(kernels, x, vecs, dy, True)
    want = x.double().var((0, 2, 3), correction=1)
    torch.testing.assert_close(got["var"].double(), want, atol=1e-6, rtol=1e-5)


def test_triton_odd_strides_and_expanded_grad(kernels):
    # x whose (h, w) do not flatten (a transposed view), and dy with a zero stride (an expand;
    # y.sum() gives all zero strides, but then dscale = sum(xhat) = 0 is all rounding error)
    base, vecs, _ = _inputs((2, 4, 5, 6), torch.float32, torch.contiguous_format)
    x = base.transpose(2, 3)
    dy = torch.randn((1, *x.shape[1:]), generator=torch.Generator().manual_seed(2)).expand(x.shape)
    got = _launch(kernels, x, vecs, dy, True)
    _assert_matches(got, _expected(x, vecs, dy, True), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Input checks and packaging
# ---------------------------------------------------------------------------------------------


def _good_args():
    x, vecs, _ = _inputs((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    return {"x": x, **vecs}


BAD_INPUTS = [
    # (argument to replace, replacement built from the good args, error, message fragment)
    ("x", lambda a: a["x"][0], ValueError, "x must be 4-D"),
    ("x", lambda a: a["x"].long(), TypeError, "x has dtype"),
    ("x", lambda a: a["x"].numpy(), TypeError, "x must be a Tensor"),
    ("x", lambda a: a["x"][:1, :, :1, :1], ValueError, "more than 1 value per channel"),
    ("weight", lambda a: a["weight"][:2], ValueError, "weight must have shape"),
    ("bias", lambda a: torch.zeros(4), ValueError, "bias must have shape"),
    ("mask", lambda a: a["mask"][None], ValueError, "mask must have shape"),
    ("running_mean", lambda a: torch.zeros(5), ValueError, "running_mean must have shape"),
    ("running_var", lambda a: torch.ones(2), ValueError, "running_var must have shape"),
    ("mask", lambda a: a["mask"].double(), TypeError, "mask has dtype"),
    ("weight", lambda a: a["weight"].half(), TypeError, "weight has dtype"),
    ("running_var", lambda a: a["running_var"].half(), TypeError, "running_var has dtype"),
    ("mask", lambda a: a["mask"].to("meta"), ValueError, "mask is on meta"),
    ("running_mean", lambda a: a["running_mean"].to("meta"), ValueError, "running_mean is on meta"),
    ("running_mean", lambda a: None, ValueError, "both given or both None"),
]


@pytest.mark.parametrize("name, make, error, match", BAD_INPUTS, ids=[f"{b[0]}-{b[3]}" for b in BAD_INPUTS])
def test_bad_inputs_raise(name, make, error, match):
    args = _good_args()
    args[name] = make(args)
    with pytest.raises(error, match=match):
        masked_batch_norm(**args, training=True, momentum=MOMENTUM, eps=EPS)


def test_bad_settings_raise():
    a = _good_args()
    vecs = (a["x"], a["weight"], a["bias"], a["mask"])
    with pytest.raises(ValueError, match="required in eval mode"):
        masked_batch_norm(*vecs, None, None, False, MOMENTUM, EPS)
    with pytest.raises(ValueError, match="momentum"):
        masked_batch_norm(*vecs, a["running_mean"], a["running_var"], True, 1.5, EPS)
    with pytest.raises(TypeError, match="momentum must be a float"):
        masked_batch_norm(*vecs, a["running_mean"], a["running_var"], True, None, EPS)
    with pytest.raises(ValueError, match="eps"):
        masked_batch_norm(*vecs, a["running_mean"], a["running_var"], True, MOMENTUM, 0.0)
    x16 = a["x"].bfloat16()
    mixed = (x16, a["weight"].bfloat16(), a["bias"], a["mask"])  # each allowed, but not together
    with pytest.raises(TypeError, match="weight, bias, mask must share one dtype"):
        masked_batch_norm(*mixed, a["running_mean"], a["running_var"], True, MOMENTUM, EPS)


def test_operator_runs_without_triton():
    # Triton made unimportable: the package, the operator and its CPU implementation still work
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "import rnp_fast.kernels as k\n"
        "assert not k.triton_available() and callable(k.masked_batch_norm_reference)\n"
        "x = torch.randn(2, 3, 4, 4, requires_grad=True)\n"
        "w, b, m = torch.ones(3), torch.zeros(3), torch.ones(3, requires_grad=True)\n"
        "k.masked_batch_norm(x, w, b, m, torch.zeros(3), torch.ones(3), True, 0.1, 1e-5).sum().backward()\n"
        "assert x.grad is not None and m.grad is not None\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# CUDA only: the operator's Triton implementation, eager and compiled with Inductor
# ---------------------------------------------------------------------------------------------

# (N, C, H, W): CIFAR ResNet-18's first and last BatchNorm shapes at a reduced batch
CUDA_SHAPES = [(32, 64, 32, 32), (128, 512, 4, 4)]
# (x dtype, atol, rtol): dweight/dmask/dbias sum 32k rows in another order than the CPU does
# (fp32 rounding of sums of size ~200, hence the atol); bf16 outputs round to 8 bits
CUDA_DTYPES = [(torch.float32, 5e-4, 1e-4), (torch.bfloat16, 3e-2, 1e-2)]


@cuda_only
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", CUDA_DTYPES, ids=DTYPE_IDS)
def test_cuda_op_matches_cpu_op(dtype, atol, rtol, shape, training):
    x, vecs, dy = _inputs(shape, dtype, torch.channels_last)
    got = _run(masked_batch_norm, x, vecs, dy, training, device="cuda")
    want = _run(masked_batch_norm, x, vecs, dy, training, device="cpu", upcast=torch.float32)
    _assert_matches(got, want, atol=atol, rtol=rtol)
    assert got["y"].dtype == dtype


@cuda_only
def test_cuda_compiled_training_step_inductor():
    eager, compiled, counter = _eager_and_compiled("cuda", torch.channels_last, "inductor")
    assert counter.frame_count == 1
    # Inductor fuses and reorders the neighbouring reductions (pooling, the head, the loss)
    _assert_same_training(eager, compiled, atol=1e-4, rtol=1e-3)
