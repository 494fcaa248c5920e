"""Reference-named checkpoints load in both layouts; the masked BatchNorm is BatchNorm x mask."""

import torch
from tests_support import TINY_WIDTH

from rnp_fast.checkpoint import load_model_weights, read_state_dict
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d
from rnp_fast.models import build_model


def test_reference_layouts_load(tmp_path):
    model = build_model("resnet18", 10, TINY_WIDTH)
    state = model.state_dict()
    assert "layer2.0.shortcut.1.weight" in state  # the reference's names
    torch.save({"state_dict": state, "epoch": 80, "best_acc": 93.4}, tmp_path / "ref.tar")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "bare.pth")
    for name in ("ref.tar", "bare.pth"):
        loaded = read_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()
        fresh = load_model_weights(build_model("resnet18", 10, TINY_WIDTH), tmp_path / name, "resnet18")
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_masked_batchnorm_is_batchnorm_with_masked_gamma():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5)
    plain, masked = torch.nn.BatchNorm2d(6), MaskedBatchNorm2d(6)
    with torch.no_grad():
        for bn in (plain, masked):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1, 1)
        masked.load_state_dict({**plain.state_dict(), "neuron_mask": masked.neuron_mask}, strict=True)
        masked.neuron_mask.copy_(torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25, 0.0]))
    expected = torch.nn.functional.batch_norm(
        x, None, None, plain.weight * masked.neuron_mask, plain.bias, True, 0.1, 1e-5
    )
    assert torch.allclose(masked(x), expected, atol=1e-6)
    masked.eval()
    eval_expected = (x - masked.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        masked.running_var.view(1, -1, 1, 1) + 1e-5
    )
    eval_expected = eval_expected * (masked.weight * masked.neuron_mask).view(1, -1, 1, 1) + masked.bias.view(
        1, -1, 1, 1
    )
    assert torch.allclose(masked(x), eval_expected, atol=1e-5)
    assert set(masked.state_dict()) == set(plain.state_dict()) | {"neuron_mask"}
