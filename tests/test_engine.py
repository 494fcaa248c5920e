"""Engine settings: resolution per device, bf16 autocast and torch.compile against eager fp32."""

from __future__ import annotations

import copy

import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.config import EngineConfig, RNPConfig
from rnp_fast.engine import EAGER, EngineSettings, resolve_engine
from rnp_fast.errors import UserError
from rnp_fast.kernels import auto_table
from rnp_fast.loaders.device_loader import DeviceLoader
from rnp_fast.loaders.sources import load_source
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d, choose_bn_kernels
from rnp_fast.models import build_model
from rnp_fast.recover import recover

CPU = torch.device("cpu")


def test_cpu_defaults_train_eager_fp32_in_the_reference_layout():
    settings = resolve_engine(EngineConfig(), CPU)
    assert (settings.compile, settings.amp, settings.channels_last, settings.bn_kernel) == (False, None, False, "torch")
    assert settings.eval_channels_last and settings.eval_rows == 64  # evaluation feeds nothing back


def test_reference_mode_is_always_eager():
    config = EngineConfig(mode="reference", compile=True, amp="bf16", channels_last=True)
    assert resolve_engine(config, CPU) == EAGER


def test_explicit_flags_are_kept():
    config = EngineConfig(compile=True, amp="bf16", channels_last=True, bn_kernel="torch")
    assert resolve_engine(config, CPU) == EngineSettings(
        True, torch.bfloat16, True, False, "torch", 64, True, torch.bfloat16
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"amp": "fp16"}, "--amp fp16 needs a CUDA device"),
        ({"bn_kernel": "triton"}, "--bn-kernel triton needs a CUDA device"),
        ({"cuda_graphs": True}, "--cuda-graphs needs a CUDA device"),
    ],
)
def test_settings_the_cpu_cannot_run_are_refused(flags, message):
    with pytest.raises(UserError, match=message):
        resolve_engine(EngineConfig(**flags), CPU)


def test_bad_flag_values_are_refused():
    with pytest.raises(UserError, match="--amp must be"):
        EngineConfig(amp="fp8")
    with pytest.raises(UserError, match="--bn-kernel must be"):
        EngineConfig(bn_kernel="cuda")


def recovered_masks(engine: EngineSettings, epochs: int = 2, device=CPU, images: int = 96) -> torch.Tensor:
    source = load_source("digits")
    torch.manual_seed(0)
    unlearned = build_model("resnet18", 10, TINY_WIDTH).to(device)
    masked = build_model("resnet18", 10, TINY_WIDTH, MaskedBatchNorm2d).to(device)
    loader = DeviceLoader(source.train.subset(torch.arange(images)), source.mean, source.std, 32, device, seed=0)
    result = recover(masked, unlearned, loader, RNPConfig(recovering_epochs=epochs), engine=engine)
    return torch.tensor([channel.value for channel in result.channels])


def test_bf16_autocast_recovers_masks_close_to_fp32():
    fp32 = recovered_masks(EAGER)
    bf16 = recovered_masks(EngineSettings(amp=torch.bfloat16, channels_last=True))
    # bf16 keeps 8 bits of mantissa: after 6 mask steps at lr 0.2 the masks agree to a few 1e-2
    assert (fp32 - bf16).abs().max() < 5e-2
    assert (fp32 - bf16).abs().mean() < 5e-3


@pytest.mark.slow
def test_compiled_recover_matches_eager():
    eager = recovered_masks(EAGER, epochs=1)
    compiled = recovered_masks(EngineSettings(compile=True), epochs=1)
    # Inductor fuses and reorders the reductions: equal to float32 rounding over three mask steps
    assert torch.allclose(eager, compiled, atol=5e-4)
    assert (eager - compiled).abs().mean() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphed_recover_step_matches_eager_on_cuda():
    """--cuda-graphs without --compile: full batches replay the captured step, the partial last
    batch (100 = 3 x 32 + 4) runs eagerly; the same kernels in the same order as eager."""
    cuda = torch.device("cuda")
    eager = recovered_masks(EngineSettings(), device=cuda, images=100)
    graphed = recovered_masks(EngineSettings(cuda_graphs=True), device=cuda, images=100)
    assert (eager - graphed).abs().max() < 1e-4


def test_bn_kernel_choice_is_made_once_per_layer():
    model = torch.nn.Sequential(MaskedBatchNorm2d(4)).train()
    x = torch.randn(2, 4, 3, 3)
    expected = copy.deepcopy(model)(x)
    choose_bn_kernels(model, "triton", x)
    assert model[0].fused  # the fused operator (its PyTorch implementation on a CPU tensor)
    assert torch.allclose(model(x), expected, atol=1e-5)
    choose_bn_kernels(model, "auto", x)
    assert not model[0].fused  # auto never picks the operator off the GPU
    with pytest.raises(ValueError, match="torch, triton or auto"):
        choose_bn_kernels(model, "cudnn", x)


def test_auto_table_lists_only_measured_winners(tmp_path, monkeypatch):
    table = tmp_path / "auto_table.json"
    model = build_model("resnet18", 10, TINY_WIDTH, MaskedBatchNorm2d)
    listed, other = (128, 3, 32, 32), (64, 3, 32, 32)
    cases = [
        {"key": auto_table.case_key("cpu", model, listed, torch.bfloat16), "torch_ms": 2.0, "fused_ms": 1.0},
        {"key": auto_table.case_key("cpu", model, other, None), "torch_ms": 1.0, "fused_ms": 2.0},
    ]
    monkeypatch.setattr(auto_table, "TABLE", table)
    auto_table.write_table(cases, {"device": "cpu"})
    try:
        assert auto_table.fused_wins(model, torch.empty(listed), torch.bfloat16)
        assert not auto_table.fused_wins(model, torch.empty(other), None)
        assert not auto_table.fused_wins(model, torch.empty(listed), None)  # not measured
    finally:
        auto_table.measured_cases.cache_clear()


def test_deterministic_flag_switches_pytorch_to_deterministic_kernels():
    try:
        resolve_engine(EngineConfig(deterministic=True), CPU)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.heavy
def test_the_gpu_settings_run_the_whole_defense_on_cpu(tiny_checkpoint, tmp_path):
    """bf16 autocast and channels_last through unlearning, recovering, the batched sweep and the
    summary: the code paths the GPU takes, minus compilation (see the slow test)."""
    from dataclasses import replace

    from test_pipeline import job

    from rnp_fast.defense import run_defense

    base = job(tiny_checkpoint, tmp_path / "bf16")
    summary = run_defense(replace(base, engine=replace(base.engine, amp="bf16", channels_last=True)))
    table = (tmp_path / "bf16" / "pruning_by_threshold.txt").read_text().splitlines()
    assert len(table) == 1 + 7  # header + thresholds 0, 0.15, ..., 0.9
    assert 0.0 <= summary["clean_acc_after"] <= 1.0
    assert "amp bf16" in (tmp_path / "bf16" / "output.log").read_text()


@pytest.mark.slow
def test_compiled_steps_compile_once_per_batch_shape(tiny_checkpoint, tmp_path):
    """Three unlearning and three recovering epochs over a set whose last batch is partial: each
    step compiles once, for the full batch (the partial batch runs eagerly), never again per epoch."""
    from dataclasses import replace

    import torch._dynamo.utils as dynamo_utils
    from test_pipeline import job

    from rnp_fast.defense import run_defense

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    base = job(tiny_checkpoint, tmp_path / "compiled")
    # sequential scoring: the batched scoring compiles graphs of its own (tested apart)
    run_defense(replace(base, engine=replace(base.engine, compile=True, scoring="sequential")))
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 3  # unlearn, recover, the mask clamp


def test_per_epoch_report_runs_in_bf16_only_on_amx_cpus_under_amp_auto(monkeypatch):
    from rnp_fast import engine

    monkeypatch.setattr(engine, "cpu_has_amx_bf16", lambda: True)
    settings = resolve_engine(EngineConfig(), CPU)
    assert settings.epoch_eval_amp is torch.bfloat16 and settings.amp is None  # training and scoring fp32
    assert "per-epoch report bf16" in settings.describe()
    assert resolve_engine(EngineConfig(amp="off"), CPU).epoch_eval_amp is None  # asked for fp32: everywhere
    assert resolve_engine(EngineConfig(mode="reference"), CPU).epoch_eval_amp is None
    monkeypatch.setattr(engine, "cpu_has_amx_bf16", lambda: False)
    assert resolve_engine(EngineConfig(), CPU).epoch_eval_amp is None
