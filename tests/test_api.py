"""The Python API (`rnp_fast.defend` and its building blocks) and `--arch package.module:function`:
the same defense as the CLI on a model of the caller's own class, inputs in every accepted form,
the caller's model left alone, clear refusals, and the README's example as written."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from own_resnet import OwnResNet18, copy_weights
from tests_support import TINY_WIDTH, strict_json_files
from torch import nn
from torch.utils.data import TensorDataset

import rnp_fast
from rnp_fast.attacks import build_trigger
from rnp_fast.checkpoint import read_state_dict, save_safetensors
from rnp_fast.cli import main
from rnp_fast.demo import demo_checkpoint
from rnp_fast.errors import UserError
from rnp_fast.evaluation.scoring import samples_independent
from rnp_fast.evaluation.test_sets import build_test_sets
from rnp_fast.loaders.sources import digits_source
from rnp_fast.masked_batchnorm import MaskedBatchNorm2d
from rnp_fast.models import build_model
from rnp_fast.models.imported import parse_arch_kwargs
from rnp_fast.models.swap import swap_batchnorm
from rnp_fast.prune import batchnorm_sizes

README = Path(__file__).resolve().parents[1] / "README.md"
# Short runs that still prune: masks fall below 0.45 for some channels after 2 + 3 epochs.
RNP = dict(unlearning_epochs=2, recovering_epochs=3, pruning_step=0.15)
DATA = dict(ratio=0.2, holdout=0.3, batch_size=32)
CLI_FLAGS = ["--dataset", "digits", "--ratio", "0.2", "--holdout", "0.3", "--batch-size", "32", "--device", "cpu"]
CLI_FLAGS += ["--unlearning-epochs", "2", "--recovering-epochs", "3", "--pruning-step", "0.15", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Smoke runs, not measurements: one thread, so that other jobs on shared cores cannot
    oversubscribe them into minutes (both paths of a comparison run alike)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return digits_source()


@pytest.fixture(scope="module")
def zoo_model():
    model = build_model("resnet18", 10, 0.25)
    model.load_state_dict(read_state_dict(demo_checkpoint()))
    return model


@pytest.fixture(scope="module")
def own_model(zoo_model):
    """The demo's weights in a class of its own, in train mode (the API must leave that as it is)."""
    return copy_weights(zoo_model.state_dict(), OwnResNet18()).train()


@pytest.fixture(scope="module")
def test_sets(digits):
    """The CLI's test sets for the demo's attack (BadNets, all2one, target 0)."""
    trigger = build_trigger("badnets", image_size=32, channels=3, seed=0)
    return build_test_sets(digits.test, trigger, "all2one", 0, 10, digits.mean, digits.std, torch.device("cpu"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`rnp-fast defend` on the bundled checkpoint, with the masks and pruning it computed."""
    import rnp_fast.defense as defend_module

    captured = []
    compute = defend_module.compute_defense

    def capture(*args, **kwargs):
        captured.append(compute(*args, **kwargs))
        return captured[-1]

    out = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(defend_module, "compute_defense", capture)
        argv = ["defend", "--model", demo_checkpoint(), "--out", str(out), "--arch", "resnet18", "--width", "0.25"]
        assert main(argv + CLI_FLAGS) == 0
    return out, captured[0].channels, captured[0].pruning


@pytest.fixture(scope="module")
def api_run(own_model, digits, test_sets):
    before = {key: value.clone() for key, value in own_model.state_dict().items()}
    result = rnp_fast.defend(
        own_model,
        defense=(digits.train.images, digits.train.labels),
        mean=digits.mean,
        std=digits.std,
        test=(digits.test.images, digits.test.labels),
        poisoned=(test_sets.poisoned.images, test_sets.poison_targets, test_sets.poisoned.labels),
        rnp=rnp_fast.RNPConfig(**RNP),
        data=rnp_fast.DataConfig(**DATA),
        engine=rnp_fast.EngineConfig(device="cpu", quiet=True),
    )
    return result, before


def same_metrics(a, b) -> bool:
    pairs = zip(a.as_dict().values(), b.as_dict().values(), strict=True)
    return all((math.isnan(x) and math.isnan(y)) or abs(x - y) <= 1e-6 for x, y in pairs)


def test_defend_matches_the_cli_on_the_demo_model_written_as_another_class(cli_run, api_run, zoo_model, own_model):
    _, cli_channels, cli_pruning = cli_run
    result, _ = api_run
    names = dict(zip(batchnorm_sizes(zoo_model), batchnorm_sizes(own_model), strict=True))  # zoo -> own
    api_values = {(layer, i): value for layer, mask in result.masks.items() for i, value in enumerate(mask.tolist())}
    assert len(api_values) == len(cli_channels) == 1200
    assert max(abs(api_values[names[c.layer], c.index] - c.value) for c in cli_channels) <= 1e-6
    assert [step.label for step in result.steps] == [step.label for step in cli_pruning.steps]
    assert any(step.pruned for step in result.steps)  # the comparison covers real pruning
    for api_step, cli_step, cli_metrics in zip(result.steps, cli_pruning.steps, cli_pruning.metrics, strict=True):
        assert api_step.pruned == [(names[c.layer], c.index) for c in cli_step.channels]
        assert same_metrics(api_step.metrics, cli_metrics)
    assert result.threshold == (cli_pruning.chosen.label if cli_pruning.chosen else None)
    assert same_metrics(result.defense.pruning.before, cli_pruning.before)
    assert same_metrics(result.defense.pruning.after, cli_pruning.after)


def test_the_callers_model_is_left_unchanged_and_the_result_is_a_copy_of_its_class(api_run, own_model):
    result, before = api_run
    after = own_model.state_dict()
    assert own_model.training  # it was in train mode, and stays there
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    purified = result.model
    assert type(purified) is OwnResNet18 and purified is not own_model and purified.training
    assert list(purified.state_dict()) == list(before)
    chosen = next(step for step in result.steps if step.label == result.threshold)
    assert chosen.pruned and all(
        float(purified.get_submodule(layer).weight.detach()[i]) == 0 for layer, i in chosen.pruned
    )


def test_save_writes_the_clis_run_directory_and_never_over_a_foreign_folder(api_run, cli_run, tmp_path):
    result, _ = api_run
    out = result.save(tmp_path / "api")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in cli_run[0].iterdir())
    assert "Model Recovering" in (out / "output.log").read_text()
    summary = strict_json_files(out)["summary.json"]  # no NaN: a figure not measured is null with its reason
    assert summary["robust_acc_before_n"] > 0 and summary["robust_acc_before"] is not None  # true labels given
    assert summary["clean_acc_full_drop_n"] == summary["clean_acc_full_before_n"] > 0
    result.save(tmp_path / "api")  # its own folder: replaced
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not made by rnp-fast"):
        result.save(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_prune_model_by_threshold_or_count_prunes_what_the_schedule_lists(api_run, own_model):
    result, _ = api_run
    step = next(step for step in result.steps if step.pruned)
    by_threshold = rnp_fast.prune_model(own_model, result.masks, threshold=step.label)
    by_count = rnp_fast.prune_model(own_model, result.masks, count=len(step.pruned))
    for pruned in (by_threshold, by_count):
        zeroed = {
            (layer, i)
            for layer in result.masks
            for i in torch.nonzero(pruned.get_submodule(layer).weight == 0).flatten().tolist()
        }
        assert zeroed == set(step.pruned)
    with pytest.raises(UserError, match="one of them"):
        rnp_fast.prune_model(own_model, result.masks)


def test_prune_model_holds_masks_to_a_mask_files_rules(api_run, own_model):
    """As a mask file: every BatchNorm channel once, each value a number in [0, 1]."""
    masks = api_run[0].masks
    first = next(iter(masks))
    with pytest.raises(UserError, match=rf"masks\['{first}'\]\[0\]: mask value nan is not a number in \[0, 1\]"):
        rnp_fast.prune_model(own_model, {**masks, first: torch.full_like(masks[first], float("nan"))}, threshold=0.5)
    with pytest.raises(UserError, match="mask value -5.0 is not a number"):
        rnp_fast.prune_model(own_model, {**masks, first: torch.full_like(masks[first], -5.0)}, threshold=0.5)
    missing = {layer: values for layer, values in masks.items() if layer != first}
    with pytest.raises(UserError, match=rf"first missing: {first}\[0\]\); masks must list every channel once"):
        rnp_fast.prune_model(own_model, missing, threshold=0.5)


def short_defense(model, defense, digits, **overrides):
    return rnp_fast.defend(
        model,
        defense=defense,
        mean=digits.mean,
        std=digits.std,
        test=(digits.test.images[:100], digits.test.labels[:100]),
        rnp=rnp_fast.RNPConfig(unlearning_epochs=0, recovering_epochs=2, pruning_step=0.3, allow_small_holdout=True),
        data=rnp_fast.DataConfig(ratio=1.0, holdout=0.3, batch_size=32),  # 29 held out: a smoke run
        engine=rnp_fast.EngineConfig(device="cpu", quiet=True),
        **overrides,
    )


def test_learn_masks_alone_gives_the_masks_defend_learns(zoo_model, digits):
    data = (digits.train.images[:96], digits.train.labels[:96])
    masks = rnp_fast.learn_masks(
        zoo_model,
        data,
        mean=digits.mean,
        std=digits.std,
        rnp=rnp_fast.RNPConfig(unlearning_epochs=0, recovering_epochs=2),
        data=rnp_fast.DataConfig(ratio=1.0, holdout=0.3, batch_size=32),
        engine=rnp_fast.EngineConfig(device="cpu", quiet=True),
    )
    defended = short_defense(zoo_model, data, digits)
    assert masks.keys() == defended.masks.keys()
    assert all(torch.equal(masks[k], defended.masks[k]) for k in masks)


def test_a_dataset_and_tensors_in_other_layouts_give_the_same_result(zoo_model, digits):
    images, labels = digits.train.images[:96], digits.train.labels[:96]
    from_tensors = short_defense(zoo_model, (images, labels), digits)
    as_float_nhwc = images.permute(0, 2, 3, 1).float() / 255  # exactly representable in 8 bits
    from_dataset = short_defense(zoo_model, TensorDataset(as_float_nhwc, labels), digits)
    from_numpy = short_defense(zoo_model, (images.permute(0, 2, 3, 1).numpy(), labels.numpy()), digits)
    for other in (from_dataset, from_numpy):
        assert all(torch.equal(from_tensors.masks[k], other.masks[k]) for k in from_tensors.masks)
        assert [s.pruned for s in other.steps] == [s.pruned for s in from_tensors.steps]
        assert all(same_metrics(a.metrics, b.metrics) for a, b in zip(other.steps, from_tensors.steps, strict=True))


class NoNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


class BatchStatistics(NoNorm):
    """Its BatchNorm keeps no running statistics: eval-mode outputs depend on the whole batch."""

    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.norm = norm or nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean((2, 3)))


def test_models_rnp_cannot_mask_are_refused_with_the_layers_named(digits):
    data = (digits.train.images[:8], digits.train.labels[:8])
    with pytest.raises(UserError, match="NoNorm has no BatchNorm2d layer"):
        rnp_fast.defend(NoNorm(), data, mean=digits.mean, std=digits.std)
    with pytest.raises(UserError, match=r"norm: BatchNorm1d is not a 2-d BatchNorm"):
        rnp_fast.defend(BatchStatistics(nn.BatchNorm1d(4)), data, mean=digits.mean, std=digits.std)
    with pytest.raises(UserError, match=r"norm: affine=False"):
        rnp_fast.defend(BatchStatistics(nn.BatchNorm2d(4, affine=False)), data, mean=digits.mean, std=digits.std)
    with pytest.raises(UserError, match=r"do not have 3 channels"):
        rnp_fast.defend(
            BatchStatistics(),
            (torch.zeros(8, 2, 32, 32, dtype=torch.uint8), digits.train.labels[:8]),
            mean=digits.mean,
            std=digits.std,
        )


def test_swapping_keeps_names_buffers_and_flags_and_takes_syncbatchnorm():
    model = BatchStatistics(nn.SyncBatchNorm(4)).eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_()
        model.norm.weight.uniform_()
    model.norm.num_batches_tracked.fill_(7)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masked = swap_batchnorm(model, MaskedBatchNorm2d)
    assert type(masked.norm) is MaskedBatchNorm2d and not masked.norm.training
    swapped = masked.state_dict()
    assert set(swapped) == set(state) | {"norm.neuron_mask"}
    assert all(torch.equal(swapped[k], state[k]) for k in state)


def test_a_batch_dependent_model_is_scored_sequentially_with_a_warning(digits):
    images = digits.train.images[:8]
    mean, std = torch.tensor(digits.mean), torch.tensor(digits.std)
    assert samples_independent(build_model("resnet18", 10, 0.125).eval(), images, mean, std)
    assert not samples_independent(BatchStatistics(), images, mean, std)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match="scored sequentially"):
        result = short_defense(BatchStatistics(), (digits.train.images[:64], digits.train.labels[:64]), digits)
    assert len(result.masks["norm"]) == 4


def test_arch_kwargs_are_read_as_numbers_booleans_or_text():
    assert parse_arch_kwargs(["num_classes=10,width=0.5", "pretrained=False", "name=wide"]) == {
        "num_classes": 10,
        "width": 0.5,
        "pretrained": False,
        "name": "wide",
    }
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_arch_kwargs(["10"])


def test_the_cli_defends_a_model_from_a_factory_module(own_model, tmp_path, capsys):
    checkpoint = tmp_path / "own.safetensors"
    save_safetensors(own_model.state_dict(), checkpoint)
    out = tmp_path / "run"
    argv = ["defend", "--model", str(checkpoint), "--out", str(out), "--arch", "own_resnet:own_resnet18"]
    argv += ["--arch-kwargs", "num_classes=10", "--arch-kwargs", "base=16", *CLI_FLAGS, "--recovering-epochs", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    masks = (out / "mask_values.txt").read_text()
    assert "stem_norm" in masks and "units.7.second_norm" in masks


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--arch", "no_such_module_here:build"], "cannot import no_such_module_here"),
        (["--arch", "own_resnet:nothing"], "own_resnet has no nothing"),
        (["--arch", "own_resnet:own_resnet18", "--arch-kwargs", "depth=3"], "unexpected keyword argument"),
        (["--arch", "own_resnet:own_resnet18", "--width", "0.5"], "--width is for the zoo"),
        (["--arch-kwargs", "base=16"], "--arch-kwargs is for an --arch package.module:function"),
    ],
)
def test_bad_factory_flags_are_one_line_errors(flags, message, tiny_checkpoint, tmp_path, capsys):
    argv = ["defend", "--model", str(tiny_checkpoint), "--out", str(tmp_path / "run"), *flags, *CLI_FLAGS]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.heavy
def test_the_readmes_python_example_runs_as_written(tmp_path, monkeypatch):
    section = README.read_text(encoding="utf-8").split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    summary = strict_json_files(tmp_path / "rnp-python-run")["summary.json"]  # strict: NaN would raise
    assert summary["robust_acc_before"] is None and "true labels" in summary["robust_acc_before_reason"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_is_defended_in_float32_and_handed_back_in_its_dtype(dtype, digits):
    """The caller's model stays as it was (values and dtype); the purified copy has its dtypes."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, TINY_WIDTH).to(dtype)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    result = rnp_fast.defend(
        model,
        defense=(digits.train.images[:160], digits.train.labels[:160]),
        mean=digits.mean,
        std=digits.std,
        rnp=rnp_fast.RNPConfig(unlearning_epochs=0, recovering_epochs=1, threshold=0.5),
        data=rnp_fast.DataConfig(ratio=1.0, holdout=0.0, batch_size=32),
        engine=rnp_fast.EngineConfig(quiet=True, device="cpu"),
    )
    assert all(
        torch.equal(before[key], value) and value.dtype == before[key].dtype
        for key, value in model.state_dict().items()
    )
    assert {value.dtype for value in result.model.state_dict().values() if value.is_floating_point()} == {dtype}
    assert result.summary["pruned"] == sum(len(mask) - int((mask > 0.5).sum()) for mask in result.masks.values())
