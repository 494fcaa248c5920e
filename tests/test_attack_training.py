"""Attack options from the command line, WaNet's noise mode in the poisoning plan, and the
label-consistent attack (PGD-hardened target-class images, then the four-corner trigger)."""

import json

import numpy as np
import pytest
import torch
from tests_support import TINY_WIDTH

from rnp_fast.attacks import build_trigger, parse_attack_params, training_plan
from rnp_fast.attacks.blend import noise_pattern
from rnp_fast.attacks.label_consistent import LabelConsistentTrigger, pgd_linf
from rnp_fast.cli import main
from rnp_fast.config import AttackConfig, DataConfig, EngineConfig, ModelConfig, TrainConfig
from rnp_fast.errors import UserError
from rnp_fast.loaders.sources import ImageSet, load_source
from rnp_fast.models import build_model
from rnp_fast.resolved import resolve_run
from rnp_fast.train import harden_poisoned_images

# ---------------------------------------------------------------- --attack-param / --trigger-seed


def test_attack_params_are_parsed_to_numbers_none_and_strings():
    parsed = parse_attack_params(["alpha=0.3", "k=4", "pattern=dir/t.png", "mask=None", "mask-mode=alpha"])
    assert parsed == {"alpha": 0.3, "k": 4, "pattern": "dir/t.png", "mask": None, "mask_mode": "alpha"}
    assert isinstance(parsed["k"], int)
    with pytest.raises(UserError, match="'alpha' must be KEY=VALUE"):
        parse_attack_params(["alpha"])
    with pytest.raises(UserError, match="alpha is given twice"):
        parse_attack_params(["alpha=0.1", "alpha=0.2"])


def test_attack_config_builds_the_trigger_it_describes():
    config = AttackConfig(attack="blend", attack_param=["alpha=0.3"], trigger_seed=5)
    trigger = build_trigger(config.attack, **config.trigger_params())
    assert trigger.alpha == 0.3 and torch.equal(trigger.pattern, noise_pattern(32, 3, 5))
    assert config.label_mode == "all2one"
    assert AttackConfig(attack="sig").label_mode == "clean-label"  # the attack's own default
    assert AttackConfig(attack="lc").label_mode == "clean-label"
    assert AttackConfig(attack="sig", label_mode="all2one").label_mode == "all2one"  # explicit wins
    with pytest.raises(UserError, match="'wanet' has no parameter 'alpha'.*noise_rate"):
        AttackConfig(attack="wanet", attack_param=["alpha=0.3"])
    with pytest.raises(UserError, match="'user' needs parameter 'pattern'"):
        AttackConfig(attack="user")
    with pytest.raises(UserError, match="unknown attack 'blends'"):
        AttackConfig(attack="blends")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attack", "blend", "--attack-param", "alpah=0.2"], "attack 'blend' has no parameter 'alpah'"),
        (["--attack", "blend", "--attack-param", "alpha=2"], "blend alpha must lie in [0, 1]"),
        (["--attack", "blend", "--attack-param", "alpha=high"], "attack 'blend'"),
        (["--attack", "badnets", "--attack-param", "size"], "must be KEY=VALUE"),
        (["--attack", "trojan", "--attack-param", "path={missing}"], "cannot read a trojan .npz"),
        (["--attack", "lc", "--attack-param", "eps=0"], "label-consistent needs 0 < eps <= 255"),
        (["--poison-rate", "1.5"], "--poison-rate must be in (0, 1]"),
    ],
)
@pytest.mark.parametrize("command", ["train-backdoor", "defend"])
def test_bad_attack_options_are_one_line_exit_2(command, extra, message, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    extra = [a.format(missing=tmp_path / "none.npz") for a in extra]
    args = [command, "--out", str(out), "--dataset", "digits", "--width", str(TINY_WIDTH), "--device", "cpu"]
    if command == "defend":  # --allow-small-holdout: the default data's one held-out image is refused first
        args += ["--model", str(tiny_checkpoint), "--allow-small-holdout"]
    if command == "defend" and extra[0] == "--poison-rate":
        pytest.skip("defend has no --poison-rate")
    assert main([*args, "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


# ---------------------------------------------------------------- WaNet noise mode in the plan


def test_wanet_plan_has_disjoint_noise_samples_that_keep_their_labels():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 10
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=generator)
    trigger = build_trigger("wanet", seed=3)
    plan = training_plan(trigger, labels, 0.1, "all2one", 0, 10, seed=1)
    assert int(plan.poisoned.sum()) == 20 and int(plan.noise.sum()) == 40  # cross ratio 2 x 10 %
    assert not (plan.poisoned & plan.noise).any()
    # The poisoned set is what it was before noise mode existed (drawn first, same generator).
    expected = torch.randperm(200, generator=torch.Generator().manual_seed(1))[:20]
    assert set(torch.nonzero(plan.poisoned).flatten().tolist()) == set(expected.tolist())

    batch = torch.arange(0, 200, 3)  # any batch: rows are looked up by dataset index
    out, out_labels = plan.apply(images[batch], labels[batch], batch)
    poisoned, noisy = plan.poisoned[batch], plan.noise[batch]
    assert torch.equal(out[poisoned], trigger.apply(images[batch][poisoned]))
    assert torch.equal(out[noisy], trigger.apply_noise(images[batch][noisy], batch[noisy]))
    clean = ~(poisoned | noisy)
    assert torch.equal(out[clean], images[batch][clean])
    assert (out_labels[poisoned] == 0).all() and torch.equal(out_labels[~poisoned], labels[batch][~poisoned])

    params = {"noise_rate": 0.05}
    assert int(training_plan(build_trigger("wanet", **params), labels, 0.1, "all2one", 0, 10, 1).noise.sum()) == 10
    none = training_plan(build_trigger("wanet", cross_ratio=0), labels, 0.1, "all2one", 0, 10, 1)
    assert int(none.noise.sum()) == 0
    assert training_plan(build_trigger("badnets"), labels, 0.1, "all2one", 0, 10, 1).noise is None


# ---------------------------------------------------------------- label-consistent


def tiny_model(num_classes=10):
    torch.manual_seed(0)
    return build_model("resnet18", num_classes, TINY_WIDTH)


def test_pgd_stays_in_the_eps_ball_and_raises_the_loss():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.arange(6) % 10
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trigger = LabelConsistentTrigger(eps=8, step_size=2, steps=5)
    adversarial = pgd_linf(model, images, labels, mean, std, trigger)
    assert adversarial.dtype == torch.uint8 and adversarial.shape == images.shape
    change = (adversarial.int() - images.int()).abs()
    assert change.max() <= 8 and change.float().mean() > 2  # signed steps move nearly every pixel
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched

    def loss(batch):
        normalised = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model.eval()(normalised), labels).item()

    assert loss(adversarial) > loss(images)
    assert torch.equal(trigger.perturb(model, images, labels, mean, std, batch_size=4), adversarial)


def test_label_consistent_test_trigger_is_the_four_corner_pattern():
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(build_trigger("lc").apply(images), build_trigger("four-corner").apply(images))


def test_hardening_perturbs_only_the_poisoned_target_images(tmp_path):
    source = load_source("digits")
    source.train = source.train.subset(torch.arange(120))  # a small slice keeps the test fast on CPU
    trigger = build_trigger("lc", eps=4, steps=2, clean_epochs=1)
    plan = training_plan(trigger, source.train.labels, 0.05, "clean-label", 3, 10, seed=0)
    attack = AttackConfig(attack="lc", attack_param=["eps=4", "steps=2", "clean_epochs=1"])
    data = DataConfig(dataset="digits", batch_size=32)
    run = resolve_run(ModelConfig(width=TINY_WIDTH), data, attack, EngineConfig(device="cpu"), source=source)
    hardened, facts = harden_poisoned_images(run, plan, TrainConfig(epochs=1))
    assert isinstance(hardened, ImageSet) and torch.equal(hardened.labels, source.train.labels)
    chosen = plan.poisoned
    assert (source.train.labels[chosen] == 3).all() and int(chosen.sum()) == 6
    assert torch.equal(hardened.images[~chosen], source.train.images[~chosen])
    change = (hardened.images[chosen].int() - source.train.images[chosen].int()).abs()
    assert 0 < change.max() <= 4
    assert facts["clean_model_epochs"] == 1 and facts["eps"] == 4
    assert facts["clean_model_acc_on_poisoned_after_pgd"] <= facts["clean_model_acc_on_poisoned_before_pgd"]


def test_train_backdoor_label_consistent_end_to_end(tmp_path):
    from test_datasets import write_folder

    root = write_folder(tmp_path / "f", per_class=6)
    out = tmp_path / "run"
    params = ["eps=8", "steps=2", "clean_epochs=1"]
    args = ["train-backdoor", "--out", str(out), "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]
    args += ["--dataset", "imagefolder", "--data-dir", str(root), "--epochs", "1", "--batch-size", "8"]
    args += ["--attack", "lc", "--target", "1", "--poison-rate", "0.34"]
    args += [a for p in params for a in ("--attack-param", p)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["AttackConfig"]["label_mode"] == "clean-label"
    assert summary["AttackConfig"]["attack_param"] == params
    assert summary["poisoned_images"] == 6 and summary["label_consistent"]["steps"] == 2
    assert np.isfinite(summary["asr"])


def test_no_poison_trains_the_clean_baseline_whatever_the_attack(tmp_path):
    """--no-poison: nothing stamped or relabelled (two attacks give the same weights, bit for bit),
    no PGD hardening, and the summary still reports the trigger's ASR on the clean model."""
    from safetensors.torch import load_file
    from test_datasets import write_folder

    root = write_folder(tmp_path / "f", per_class=6)
    common = ["--width", str(TINY_WIDTH), "--device", "cpu", "--quiet", "--dataset", "imagefolder"]
    common += ["--data-dir", str(root), "--epochs", "1", "--batch-size", "8", "--no-poison"]
    for attack in ("badnets", "lc"):
        assert main(["train-backdoor", "--out", str(tmp_path / attack), "--attack", attack, *common]) == 0
    first, second = (load_file(tmp_path / attack / "model.safetensors") for attack in ("badnets", "lc"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    summary = json.loads((tmp_path / "lc" / "summary.json").read_text())
    assert summary["poisoned_images"] == 0 and "label_consistent" not in summary
    assert summary["AttackConfig"]["poison"] is False and 0 <= summary["asr"] <= 1


@pytest.mark.heavy
def test_train_backdoor_takes_the_engine_flags(tmp_path, monkeypatch):
    """--compile / --amp reach the training step (compiled here with Dynamo's eager backend:
    graph capture without code generation)."""
    from dataclasses import replace

    from rnp_fast import train

    seen, fit = [], train.fit

    def recording_fit(model, loader, config, on_epoch=None, engine=None):
        seen.append(engine)
        return fit(model, loader, config, on_epoch, replace(engine, compile_backend="eager"))

    monkeypatch.setattr(train, "fit", recording_fit)
    out = tmp_path / "run"
    args = ["train-backdoor", "--out", str(out), "--width", str(TINY_WIDTH), "--device", "cpu", "--quiet"]
    args += ["--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--compile", "--amp", "bf16"]
    assert main(args) == 0
    assert seen[0].compile and seen[0].amp is torch.bfloat16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["EngineConfig"]["amp"] == "bf16" and summary["EngineConfig"]["compile"] is True
