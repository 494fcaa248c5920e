"""Triton masked BatchNorm (rnp_fast.kernels.masked_bn) against the pure-PyTorch reference.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (small shapes only);
with a GPU the same comparisons run on CUDA with compiled kernels, plus the CUDA-only tests at the
end (ResNet-18 shapes, torch.compile(fullgraph=True)). The expected values always come from the
reference evaluated in fp32 on upcast copies of the inputs, so the tolerances below measure the
kernel's own error.
"""

import os

import torch

# triton.jit reads TRITON_INTERPRET when the kernels are decorated, i.e. when
# rnp_fast.kernels.masked_bn is imported, so set it before that (and before importing triton).
# Only without a GPU: with one, the kernels must be compiled for real (torch.compile cannot trace
# a triton_op in interpreter mode).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from rnp_fast.kernels import masked_bn as mbn  # noqa: E402
from rnp_fast.kernels.masked_bn import masked_batch_norm  # noqa: E402
from rnp_fast.kernels.reference import masked_batch_norm_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# (N, C, H, W), tiny because the interpreter runs every program in Python:
SHAPES = [
    (2, 3, 4, 4),  # C smaller than any channel block (masked channel lanes)
    (4, 8, 5, 3),  # odd H and W, M = 60 not a multiple of the row block
    (3, 16, 8, 8),  # the largest: M = 192 rows, 16 channels
]
# (x dtype, atol, rtol); parameters and running statistics stay fp32 (the AMP setting). The low
# precision tolerances are about one rounding of the output: bf16 has an 8-bit significand
# (relative step 2^-8 = 3.9e-3), fp16 an 11-bit one (2^-11 = 4.9e-4); outputs are O(1-5).
DTYPES = [
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 1e-2),
    (torch.float16, 3e-3, 2e-3),
]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
MOMENTUM, EPS = 0.1, 1e-5
GRAD_NAMES = ("x", "weight", "bias", "mask")


def _inputs(shape, dtype, layout, param_dtype=torch.float32, seed=0):
    """x (mean 3, std 2, so the normalisation matters), weight, bias, mask in [0, 1], running stats."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
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


def _run(fn, x, vecs, dy, training, relu, device, upcast=False, requires_grad=GRAD_NAMES):
    """Forward + backward through fn; returns every output, running stat and gradient on the CPU."""
    cast = (lambda t: t.float()) if upcast else (lambda t: t)
    leaves = {"x": x, **{k: vecs[k] for k in ("weight", "bias", "mask")}}
    leaves = {k: cast(v).to(device).detach().requires_grad_(k in requires_grad) for k, v in leaves.items()}
    rm, rv = (cast(vecs[k]).to(device).clone() for k in ("running_mean", "running_var"))
    y = fn(leaves["x"], leaves["weight"], leaves["bias"], leaves["mask"], rm, rv, training, MOMENTUM, EPS, relu)
    wanted = [k for k in GRAD_NAMES if k in requires_grad]
    grads = torch.autograd.grad(y, [leaves[k] for k in wanted], cast(dy).to(device))
    out = {"y": y, "running_mean": rm, "running_var": rv}
    out.update({f"d{k}": gr for k, gr in zip(wanted, grads, strict=True)})
    return {k: v.detach().cpu() for k, v in out.items()}


def _assert_matches(actual, expected, atol, rtol):
    assert actual.keys() == expected.keys()
    for key, exp in expected.items():
        torch.testing.assert_close(
            actual[key].float(), exp.float(), atol=atol, rtol=rtol, msg=lambda m, k=key: f"{k}: {m}"
        )


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_matches_reference(dtype, atol, rtol, shape, layout, training, relu):
    x, vecs, dy = _inputs(shape, dtype, layout)
    got = _run(masked_batch_norm, x, vecs, dy, training, relu, DEVICE)
    want = _run(masked_batch_norm_reference, x, vecs, dy, training, relu, "cpu", upcast=True)
    _assert_matches(got, want, atol, rtol)
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert got["dmask"].dtype == torch.float32
    if layout == torch.channels_last:  # outputs keep the input's layout
        assert got["y"].is_contiguous(memory_format=torch.channels_last)
        assert got["dx"].is_contiguous(memory_format=torch.channels_last)


def test_parameters_in_input_dtype():
    # a model cast wholesale to bf16: weight, bias, mask and running stats in bf16 too
    x, vecs, dy = _inputs((3, 16, 8, 8), torch.bfloat16, torch.channels_last, param_dtype=torch.bfloat16)
    got = _run(masked_batch_norm, x, vecs, dy, True, True, DEVICE)
    want = _run(masked_batch_norm_reference, x, vecs, dy, True, True, "cpu", upcast=True)
    _assert_matches(got, want, atol=2e-2, rtol=1e-2)
    assert got["dmask"].dtype == torch.bfloat16 and got["running_var"].dtype == torch.bfloat16


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_multi_split_reduction(monkeypatch, layout):
    # Shrink the tiles so both reduction stages loop: several row splits each summing several
    # tiles (the last ones partly or fully past M), ragged channel blocks, several stage-2 steps.
    monkeypatch.setattr(mbn, "_TILE_ELEMS", 64)
    monkeypatch.setattr(mbn, "_MAX_PROGRAMS", 4)
    monkeypatch.setattr(mbn, "_FINAL_BLOCK_P", 2)
    monkeypatch.setattr(mbn, "_FINAL_BLOCK_C", 4)
    shape = (3, 12, 7, 5)  # M = 105 rows
    plan = mbn._plan(3 * 7 * 5, 12, channels_fastest=layout == torch.channels_last)
    assert plan.splits > 1 and plan.tiles_per_split > 1 and 12 % plan.block_c != 0
    x, vecs, dy = _inputs(shape, torch.float32, layout)
    for training in (True, False):
        got = _run(masked_batch_norm, x, vecs, dy, training, True, DEVICE)
        want = _run(masked_batch_norm_reference, x, vecs, dy, training, True, "cpu")
        _assert_matches(got, want, atol=1e-5, rtol=1e-5)


def test_bitwise_deterministic():
    # two-stage reductions with a fixed order: the same inputs give the same bits every time
    x, vecs, dy = _inputs((3, 16, 8, 8), torch.float32, torch.channels_last)
    first = _run(masked_batch_norm, x, vecs, dy, True, True, DEVICE)
    second = _run(masked_batch_norm, x, vecs, dy, True, True, DEVICE)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_variance_accurate_with_large_mean():
    # mean 1e3, std 1: sum(x^2) - M*mean^2 would cancel ~6 of fp32's 7 digits; the shifted sums do not
    x, vecs, dy = _inputs((4, 8, 5, 3), torch.float32, torch.contiguous_format)
    x = x - 3 + 1000
    got = _run(masked_batch_norm, x, vecs, dy, True, False, DEVICE)
    x64 = x.double().transpose(0, 1).reshape(8, -1)
    want_var = 0.9 * vecs["running_var"].double() + 0.1 * x64.var(dim=1, unbiased=True)
    torch.testing.assert_close(got["running_var"].double(), want_var, atol=1e-6, rtol=1e-5)


def test_odd_strides_and_expanded_grad():
    # x whose (h, w) do not flatten (a transposed view), and dy = ones with zero strides (from sum())
    base, vecs, _ = _inputs((2, 4, 5, 6), torch.float32, torch.contiguous_format)
    results = []
    for fn, device in ((masked_batch_norm, DEVICE), (masked_batch_norm_reference, "cpu")):
        x = base.to(device).transpose(2, 3).detach().requires_grad_(True)
        mask = vecs["mask"].to(device).requires_grad_(True)
        rm, rv = vecs["running_mean"].to(device).clone(), vecs["running_var"].to(device).clone()
        y = fn(x, vecs["weight"].to(device), vecs["bias"].to(device), mask, rm, rv, True, MOMENTUM, EPS, True)
        y.sum().backward()
        results.append([t.detach().cpu() for t in (y, rm, rv, x.grad, mask.grad)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_frozen_parameters_and_no_running_stats():
    # RNP's recover stage: only the mask (and x upstream) need gradients; BN without tracking
    x, vecs, dy = _inputs((4, 8, 5, 3), torch.float32, torch.channels_last)
    got = _run(masked_batch_norm, x, vecs, dy, True, True, DEVICE, requires_grad=("x", "mask"))
    want = _run(masked_batch_norm_reference, x, vecs, dy, True, True, "cpu", requires_grad=("x", "mask"))
    _assert_matches(got, want, atol=1e-5, rtol=1e-5)
    leaves = [t.to(DEVICE) for t in (x, vecs["weight"], vecs["bias"], vecs["mask"])]
    y_none = masked_batch_norm(*leaves, None, None, True, MOMENTUM, EPS)
    y_ref = masked_batch_norm_reference(*[t.cpu() for t in leaves], None, None, True, MOMENTUM, EPS)
    torch.testing.assert_close(y_none.cpu(), y_ref, atol=1e-5, rtol=1e-5)


def test_ops_registration():
    # schema, fake (meta) kernels against the real ones, and autograd registration
    x, vecs, dy = _inputs((2, 3, 4, 4), torch.float32, torch.channels_last)
    x, dy = x.to(DEVICE), dy.to(DEVICE)
    v = {k: t.to(DEVICE) for k, t in vecs.items()}
    mean, rstd = torch.ops.rnp_fast.masked_bn_stats(x, v["running_mean"], v["running_var"], True, 0.1, EPS)
    params = (v["weight"], v["bias"], v["mask"])
    cases = [
        (
            torch.ops.rnp_fast.masked_bn_stats.default,
            (x, v["running_mean"], v["running_var"], True, 0.1, EPS),
        ),
        (torch.ops.rnp_fast.masked_bn_stats.default, (x, None, None, True, 0.1, EPS)),
        (torch.ops.rnp_fast.masked_bn_apply.default, (x, mean, rstd, *params, True, True)),
        (torch.ops.rnp_fast.masked_bn_backward.default, (dy, x, mean, rstd, *params, True, True)),
    ]
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    for op, args in cases:
        result = torch.library.opcheck(op, args, test_utils=checks)
        assert set(result.values()) == {"SUCCESS"}, (op, result)


def _good_args(device="cpu"):
    x, vecs, _ = _inputs((2, 3, 4, 4), torch.float32, torch.contiguous_format)
    args = {"x": x, **vecs}
    return {k: t.to(device) for k, t in args.items()}


BAD_INPUTS = [
    # (argument to replace, replacement built from the good args, error, message fragment)
    ("x", lambda a: a["x"][0], ValueError, "x must be 4-D"),
    ("x", lambda a: a["x"].double(), TypeError, "x has dtype"),
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
    args = _good_args(DEVICE)
    args[name] = make(args)
    with pytest.raises(error, match=match):
        masked_batch_norm(**args, training=True, momentum=MOMENTUM, eps=EPS)


def test_bad_settings_raise():
    a = _good_args(DEVICE)
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


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import rnp_fast.kernels as k\n"
        "assert not k.triton_available()\n"
        "assert callable(k.masked_batch_norm_reference)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---------------------------------------------------------------------------------------------
# CUDA only
# ---------------------------------------------------------------------------------------------

# (N, C, H, W): CIFAR ResNet-18's first and last BatchNorm shapes at a reduced batch
CUDA_SHAPES = [(32, 64, 32, 32), (128, 512, 4, 4)]


@cuda_only
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_resnet_shapes_bf16_channels_last(shape, training):
    x, vecs, dy = _inputs(shape, torch.bfloat16, torch.channels_last)
    got = _run(masked_batch_norm, x, vecs, dy, training, True, "cuda")
    want = _run(masked_batch_norm_reference, x, vecs, dy, training, True, "cuda", upcast=True)
    # dweight/dmask/dbias sum M = 32k rows of bf16 products: allow a relative 1e-2 there too
    _assert_matches(got, want, atol=3e-2, rtol=1e-2)


@cuda_only
@pytest.mark.skipif(INTERPRETED, reason="torch.compile cannot trace a triton_op in interpreter mode")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_compile_fullgraph_matches_eager(training):
    def step(x, weight, bias, mask, rm, rv, training, momentum, eps, relu):
        y = masked_batch_norm(x, weight, bias, mask, rm, rv, training, momentum, eps, relu)
        return y * 2.0  # a neighbouring op for Inductor to schedule around the kernels

    compiled = torch.compile(step, fullgraph=True)
    x, vecs, dy = _inputs((8, 64, 16, 16), torch.float32, torch.channels_last)
    eager = _run(step, x, vecs, dy, training, True, "cuda")
    got = _run(compiled, x, vecs, dy, training, True, "cuda")
    _assert_matches(got, eager, atol=1e-5, rtol=1e-5)
    want = _run(masked_batch_norm_reference, x, vecs, dy * 2.0, training, True, "cuda")
    torch.testing.assert_close(got["dmask"], want["dmask"], atol=1e-4, rtol=1e-4)
