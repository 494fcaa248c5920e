"""Backdoor attacks: triggers as batched device operations, and poisoning plans.

``build_trigger(name, image_size, channels, seed, **params)`` is the one entry point: every factory
in ``TRIGGERS`` takes keyword arguments only (``image_size``, ``channels``, ``seed`` and its own
parameters, all with defaults except files a trigger cannot do without), so ``TRIGGERS[name]()``
also works. ``DEFAULT_LABEL_MODE`` gives the label mode each attack is normally run with.
"""

from __future__ import annotations

import inspect
from os import PathLike

from rnp_fast.attacks.badnets import four_corner_trigger, grid_trigger, one_pixel_trigger, square_trigger
from rnp_fast.attacks.base import (
    LABEL_MODES,
    PoisonPlan,
    Trigger,
    poisoned_labels,
    poisoned_test_plan,
    training_plan,
)
from rnp_fast.attacks.blend import blend_trigger
from rnp_fast.attacks.label_consistent import label_consistent_trigger
from rnp_fast.attacks.sig import SigTrigger, reference_sig_trigger
from rnp_fast.attacks.trojan import load_reference_trojan, seeded_trojan
from rnp_fast.attacks.user_patch import load_png, user_trigger
from rnp_fast.attacks.wanet import WaNetTrigger
from rnp_fast.errors import UserError

# The shared keywords every factory accepts; the BadNets family ignores them (size-agnostic stamps).
COMMON = ("image_size", "channels", "seed")


def _grid(*, image_size=32, channels=3, seed=0):
    return grid_trigger()


def _square(*, image_size=32, channels=3, seed=0, size=3, distance=1):
    return square_trigger(size=size, distance=distance)


def _four_corner(*, image_size=32, channels=3, seed=0):
    return four_corner_trigger()


def _one_pixel(*, image_size=32, channels=3, seed=0):
    return one_pixel_trigger()


def _blend(*, image_size=32, channels=3, seed=0, alpha=0.2, pattern=None):
    """``pattern``: a PNG path, a uint8 [C, H, W] array/tensor, or None for seeded noise."""
    expected = (channels, image_size, image_size)
    if isinstance(pattern, (str, PathLike)):
        pattern = load_png(pattern, channels, image_size)
    if pattern is not None and tuple(pattern.shape) != expected:
        raise UserError(f"blend pattern has shape {tuple(pattern.shape)}, expected {expected}")
    return blend_trigger(pattern, alpha=alpha, image_size=image_size, channels=channels, seed=seed)


def _sig(*, image_size=32, channels=3, seed=0, delta=20.0, frequency=6.0):
    return SigTrigger(delta=delta, frequency=frequency)


def _sig_reference(*, path, image_size=32, channels=3, seed=0, alpha=0.2):
    return reference_sig_trigger(path, alpha=alpha, image_size=image_size, channels=channels)


def _trojan(*, image_size=32, channels=3, seed=0, path=None):
    """``path``: the reference's .npz; without it, a seeded 3x3 additive patch at the same place."""
    if path is None:
        return seeded_trojan(image_size, channels, seed)
    return load_reference_trojan(path, image_size=image_size, channels=channels)


def _wanet(*, image_size=32, channels=3, seed=0, k=4, strength=0.5, grid_rescale=1.0, noise_rate=None, cross_ratio=2.0):
    """``noise_rate``: share of the training set in noise mode; default cross_ratio x poisoning rate."""
    return WaNetTrigger(
        image_size,
        seed,
        k=k,
        strength=strength,
        grid_rescale=grid_rescale,
        noise_rate=noise_rate,
        cross_ratio=cross_ratio,
    )


def _label_consistent(*, image_size=32, channels=3, seed=0, eps=8.0, step_size=None, steps=10, clean_epochs=10):
    """PGD ``eps`` and ``step_size`` (default 2.5 eps / steps) in intensity levels (8 = 8/255);
    ``clean_epochs`` trains the clean model the perturbation is computed with."""
    return label_consistent_trigger(eps=eps, step_size=step_size, steps=steps, clean_epochs=clean_epochs)


def _user(*, pattern, image_size=32, channels=3, seed=0, mask=None, mask_mode="replace"):
    return user_trigger(pattern, mask=mask, mask_mode=mask_mode, image_size=image_size, channels=channels)


# name -> keyword-only factory(image_size=, channels=, seed=, **params)
TRIGGERS = {
    "badnets": _grid,
    "grid": _grid,
    "square": _square,
    "four-corner": _four_corner,
    "one-pixel": _one_pixel,
    "blend": _blend,
    "sig": _sig,
    "sig-reference": _sig_reference,
    "trojan": _trojan,
    "wanet": _wanet,
    "label-consistent": _label_consistent,
    "lc": _label_consistent,
    "user": _user,
}

# SIG and label-consistent are clean-label by design (they only poison target-class images); the
# rest relabel to the target.
CLEAN_LABEL_ATTACKS = ("sig", "sig-reference", "label-consistent", "lc")
DEFAULT_LABEL_MODE = {name: ("clean-label" if name in CLEAN_LABEL_ATTACKS else "all2one") for name in TRIGGERS}


def trigger_parameters(name: str) -> list[str]:
    """The attack-specific parameter names ``build_trigger`` accepts for ``name``."""
    return [p for p in inspect.signature(TRIGGERS[name]).parameters if p not in COMMON]


def parse_attack_params(items: list[str] | tuple[str, ...]) -> dict:
    """``["alpha=0.1", "pattern=t.png"]`` -> ``{"alpha": 0.1, "pattern": "t.png"}``.

    Values that read as an int or a float become numbers; ``none`` becomes None; the rest stay
    strings (file paths, modes). A malformed or repeated item is a UserError.
    """
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UserError(f"--attack-param {item!r} must be KEY=VALUE, e.g. alpha=0.1")
        if key in params:
            raise UserError(f"--attack-param {key} is given twice")
        params[key] = _parse_value(text.strip())
    return params


def _parse_value(text: str):
    if text.lower() in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def check_attack(name: str, params: dict) -> None:
    """UserError for an unknown attack or an unknown or missing parameter of ``name``."""
    if name not in TRIGGERS:
        raise UserError(f"unknown attack {name!r}; choose one of {', '.join(TRIGGERS)}")
    allowed = trigger_parameters(name)
    for key in params:
        if key not in allowed:
            valid = ", ".join(allowed) or "none"
            raise UserError(f"attack {name!r} has no parameter {key!r} (valid: {valid})")
    signature = inspect.signature(TRIGGERS[name])
    missing = [p.name for p in signature.parameters.values() if p.default is p.empty and p.name not in params]
    if missing:
        raise UserError(f"attack {name!r} needs parameter {missing[0]!r} (--attack-param {missing[0]}=...)")


def build_trigger(name: str, image_size: int = 32, channels: int = 3, seed: int = 0, **params) -> Trigger:
    """The trigger ``name`` for ``channels`` x ``image_size`` x ``image_size`` images.

    Raises UserError for an unknown attack, an unknown or missing parameter, or a bad value.
    """
    check_attack(name, params)
    try:
        return TRIGGERS[name](image_size=image_size, channels=channels, seed=seed, **params)
    except (ValueError, TypeError) as error:  # bad values (alpha out of range, a word for a number): the user's
        raise UserError(f"attack {name!r}: {error}") from error


__all__ = [
    "DEFAULT_LABEL_MODE",
    "LABEL_MODES",
    "PoisonPlan",
    "TRIGGERS",
    "Trigger",
    "build_trigger",
    "check_attack",
    "parse_attack_params",
    "poisoned_labels",
    "poisoned_test_plan",
    "training_plan",
]
